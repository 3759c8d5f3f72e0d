"""Configuration of `jobs/train_generator.py`: the MTST text generator's model, the
same distribution and run settings as the composer's job, and stages (e.g. `caption`
on a captioned corpus, then `modification` on annotated triplets from its export)."""
from __future__ import annotations

from dataclasses import dataclass, field

from cir.benchmarks.shapes import DEFAULT_ROOT as SHAPES_DEFAULT_ROOT
from cir.models.config import GENERATOR_TASKS, GeneratorConfig
from cir.synth.config import ShapesCorpusConfig
from cir.train.config import BENCHMARKS, DataConfig, DeepSpeedConfig, OptimConfig, RunSettings, validate_run


@dataclass
class RehearsalConfig:
    """An earlier stage's synth triplets mixed into a stage (the first `triplets` rows of
    that table, a stable sample), trained after their own prompt: the stage learns a new
    wording from a few annotated texts without forgetting what the earlier data taught
    (reading every object off the images)."""
    synth_dir: str = ""
    triplets: int = 5000
    reverse: bool = True
    prompt: str | None = None


@dataclass
class GeneratorDataConfig:
    # modification: annotated triplets of a benchmark's split, through cir.benchmarks
    benchmark: str = "shapes"                  # shapes | cirr | fashioniq
    benchmark_dir: str = SHAPES_DEFAULT_ROOT
    annotations: str | None = None
    images: str | None = None
    category: str = "all"
    split: str = "train"
    reverse: bool = True                       # also (target, reference) -> the reverse text, where known
    # modification, instead of a benchmark: the triplets of a synth job's output folder
    # (e.g. caption-based `template` texts, to pretrain on before the annotated split);
    # images from its corpus table, or from `corpus` below when that is set
    synth_dir: str | None = None
    # caption: a captioned Parquet corpus (a file or folder, e.g. a synth job's corpus/),
    # or "shapes": the shapes corpus below, written once under run.storage/corpora/
    corpus: str | None = None
    shapes: ShapesCorpusConfig = field(default_factory=lambda: ShapesCorpusConfig(n_images=20000, seed=1))
    limit: int | None = None
    seed: int = 0
    # the prompt these examples are trained after (None: model.modification_prompt or
    # model.caption_prompt); the synth job's mtst backend writes after the same choice
    prompt: str | None = None
    rehearse: RehearsalConfig | None = None    # modification: mix an earlier stage's data in

    def rehearsal(self) -> "GeneratorDataConfig":
        """The data section of the rehearsed examples."""
        r = self.rehearse
        return GeneratorDataConfig(synth_dir=r.synth_dir, limit=r.triplets, reverse=r.reverse, prompt=r.prompt,
                                   seed=self.seed)

    def validate(self, where: str, task: str) -> None:
        from cir.storage import StorageError, resolve

        for name, value in (("synth_dir", self.synth_dir), ("corpus", self.corpus),
                            ("rehearse.synth_dir", self.rehearse.synth_dir if self.rehearse else None)):
            if value and value != "shapes":
                try:
                    resolve(value)      # a local path or a URI pyarrow can open
                except StorageError as exc:
                    raise StorageError(f"{where}.data.{name}: {exc}") from None
        if self.rehearse is not None:
            if task != "modification":
                raise ValueError(f"{where}.data.rehearse mixes synth pairs into a modification stage, "
                                 f"not a {task!r} one")
            if not self.rehearse.synth_dir or self.rehearse.triplets < 1:
                raise ValueError(f"{where}.data.rehearse needs a synth_dir and triplets >= 1")
        if task == "caption":
            if self.prompt is not None:
                raise ValueError(f"{where}.data.prompt applies to modification stages; a caption stage "
                                 "trains after model.caption_prompt")
            if not self.corpus:
                raise ValueError(f"{where}.data.corpus is required for task 'caption': a Parquet corpus with "
                                 "captions (e.g. outputs/synth-pretrain/corpus, or one written by "
                                 "python -m cir.data.shapes_corpus corpus OUT --n 50000)")
            return
        if self.synth_dir:
            return
        if self.benchmark not in BENCHMARKS:
            raise ValueError(f"{where}.data.benchmark must be one of {', '.join(BENCHMARKS)}, got {self.benchmark!r}")
        self.as_benchmark_data()._validate_benchmark(f"{where}.data")

    def as_benchmark_data(self) -> DataConfig:
        """The composer job's data section for the same split (one benchmark reader)."""
        return DataConfig(source="benchmark", benchmark=self.benchmark, benchmark_dir=self.benchmark_dir,
                          annotations=self.annotations, images=self.images, category=self.category,
                          split=self.split, limit=self.limit, seed=self.seed)


@dataclass
class GeneratorStageConfig:
    name: str = "modification"
    task: str = "modification"                 # modification | caption
    data: GeneratorDataConfig = field(default_factory=GeneratorDataConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, warmup_steps=30, epochs=20,
                                                                   micro_batch_size=32))


@dataclass
class GeneratorTrainConfig:
    model: GeneratorConfig = field(default_factory=GeneratorConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=lambda: DeepSpeedConfig(enabled=False))
    run: RunSettings = field(default_factory=lambda: RunSettings(name="shapes-generator", eval_every=100,
                                                                 eval_limit=200))
    stages: list[GeneratorStageConfig] = field(default_factory=lambda: [GeneratorStageConfig()])

    def validate(self) -> None:
        if not self.stages:
            raise ValueError("stages: at least one stage is needed")
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique, got {names}")
        for stage in self.stages:
            where = f"stages[{stage.name}]"
            if stage.task not in GENERATOR_TASKS:
                raise ValueError(f"{where}.task must be one of {', '.join(GENERATOR_TASKS)}, got {stage.task!r}")
            stage.data.validate(where, stage.task)
            o = stage.optim
            if o.lr <= 0 or o.epochs < 1 or o.grad_accum < 1 or o.micro_batch_size < 1:
                raise ValueError(f"{where}.optim: lr > 0, epochs >= 1, grad_accum >= 1 and micro_batch_size >= 1")
        validate_run(self.run, self.deepspeed)
