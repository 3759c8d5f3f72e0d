"""Configuration of `jobs/train.py`: shared model / distribution / run settings, and
a list of stages (e.g. `pretrain` on synthetic triplets, then `finetune` on the
benchmark), each starting from the previous stage's exported model."""
from __future__ import annotations

from dataclasses import dataclass, field

from cir.benchmarks.shapes import DEFAULT_ROOT as SHAPES_DEFAULT_ROOT
from cir.embed import EmbedSettings
from cir.losses import LossConfig
from cir.models.config import ComposerConfig
from cir.storage import resolve

SOURCES = ("synth", "slerp", "benchmark")
BENCHMARKS = ("shapes", "cirr", "fashioniq")          # those with an annotated train split
FASHIONIQ_CATEGORIES = ("dress", "shirt", "toptee", "all")
FEATURES_DIR = "features"                             # the feature cache under run.storage


@dataclass
class DataConfig:
    source: str = "benchmark"          # synth | slerp | benchmark
    synth_dir: str | None = None       # jobs/synth.py output (synth and slerp sources)
    benchmark: str = "shapes"          # shapes | cirr | fashioniq (source benchmark)
    benchmark_dir: str = SHAPES_DEFAULT_ROOT   # shapes only (written on first use when the default)
    annotations: str | None = None     # cirr / fashioniq: the release folder (captions/, image_splits/)
    images: str | None = None          # cirr / fashioniq: image root (CIRR: the folder holding train/)
    category: str = "all"              # fashioniq: dress | shirt | toptee | all
    split: str = "train"
    limit: int | None = None           # at most this many examples
    slerp_alpha: float = 0.5           # CoLLM: 0.5 is best
    synthetic_share: float = 0.75      # CoLLM: ~75% of samples with synthetic text
    seed: int = 0

    def validate(self, where: str) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"{where}.data.source must be one of {', '.join(SOURCES)}, got {self.source!r}")
        if self.source in ("synth", "slerp") and not self.synth_dir:
            raise ValueError(f"{where}.data.synth_dir is required for source {self.source!r} "
                             "(the output folder of jobs/synth.py)")
        if self.source == "benchmark":
            self._validate_benchmark(f"{where}.data")

    def _validate_benchmark(self, where: str) -> None:
        name = self.benchmark
        if name == "circo":
            raise ValueError(f"{where}.benchmark 'circo' has no train split (only val and test); "
                             "train on cirr, fashioniq or shapes and evaluate on CIRCO")
        if name.startswith("fashioniq-"):
            raise ValueError(f"{where}.benchmark {name!r}: write benchmark: fashioniq and "
                             f"category: {name.split('-', 1)[1]}")
        if name not in BENCHMARKS:
            raise ValueError(f"{where}.benchmark must be one of {', '.join(BENCHMARKS)}, got {name!r}")
        if name == "shapes":
            return
        for key, what in (("annotations", "the benchmark's release folder (captions/, image_splits/)"),
                          ("images", "the folder of its images")):
            if not getattr(self, key):
                raise ValueError(f"{where}.{key} is required for benchmark {name!r}: {what}")
        if name == "fashioniq" and self.category not in FASHIONIQ_CATEGORIES:
            raise ValueError(f"{where}.category must be one of {', '.join(FASHIONIQ_CATEGORIES)}, "
                             f"got {self.category!r}")


@dataclass
class OptimConfig:
    lr: float = 3e-4
    weight_decay: float = 0.01
    warmup_steps: int = 20
    epochs: int = 1
    max_steps: int | None = None       # caps epochs * steps_per_epoch
    micro_batch_size: int = 64         # per worker
    grad_accum: int = 1
    grad_clip: float = 1.0


@dataclass
class StageConfig:
    name: str = "finetune"
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)


@dataclass
class DeepSpeedConfig:
    enabled: bool = True               # False: plain DDP
    zero_stage: int = 2
    precision: str = "fp32"            # fp32 | bf16 | fp16 (bf16/fp16 on GPUs)


@dataclass
class RunSettings:
    name: str = "shapes-A"
    storage: str = "outputs/runs"
    num_workers: int = 2
    use_gpu: bool | str = "auto"
    cpus_per_worker: float = 1.0
    torch_threads: int = 0             # 0: the node's cores shared among the workers
    report_every: int = 10
    checkpoint_every: int = 50
    eval_every: int = 50               # recall on the benchmark's val split (rank-wide)
    eval_split: str = "val"
    eval_limit: int = 300
    # Ray Train restarts a stage from its latest checkpoint after this many worker
    # failures (a killed or crashed worker, a lost node; -1: always). 2 rides out the
    # usual transient faults of a cluster (an OOM kill, a lost node) at the cost of
    # `checkpoint_every` steps each; a bug that fails every time stops after 3 tries.
    # Spot preemptions have Ray's own budget (FailureConfig.max_preemption_failures,
    # unlimited). 0: the first failure stops the job; a rerun resumes.
    max_failures: int = 2
    fail_at_step: int | None = None    # testing: raise once at this step of a fresh start


@dataclass
class TrainConfig:
    model: ComposerConfig = field(default_factory=ComposerConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    run: RunSettings = field(default_factory=RunSettings)
    # How the frozen vision tower's feature cache is encoded (Ray Data, cir.embed).
    embed: EmbedSettings = field(default_factory=EmbedSettings)
    stages: list[StageConfig] = field(default_factory=lambda: [StageConfig()])

    def validate(self) -> None:
        if not self.stages:
            raise ValueError("stages: at least one stage is needed")
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique, got {names}")
        for stage in self.stages:
            where = f"stages[{stage.name}]"
            stage.data.validate(where)
            if stage.loss.objective == "ptha" and not self.model.prototype_adapter:
                raise ValueError(f"{where}.loss: the ptha objective needs model.prototype_adapter: true")
            o = stage.optim
            if o.micro_batch_size < 2:
                raise ValueError(f"{where}.optim.micro_batch_size must be >= 2 (in-batch negatives)")
            if o.lr <= 0 or o.epochs < 1 or o.grad_accum < 1:
                raise ValueError(f"{where}.optim: lr > 0, epochs >= 1 and grad_accum >= 1 are required")
        validate_run(self.run, self.deepspeed)
        self.embed.validate("embed")


def validate_run(run: RunSettings, deepspeed: DeepSpeedConfig) -> None:
    """The checks of a training job's `run` and `deepspeed` sections (both jobs)."""
    if deepspeed.zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"deepspeed.zero_stage must be 0-3, got {deepspeed.zero_stage}")
    if deepspeed.precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"deepspeed.precision must be fp32, bf16 or fp16, got {deepspeed.precision!r}")
    if run.num_workers < 1:
        raise ValueError("run.num_workers must be >= 1")
    if run.max_failures < -1:
        raise ValueError(f"run.max_failures must be >= 0, or -1 to restart always, got {run.max_failures}")
    resolve(run.storage)      # a local folder or a URI pyarrow can open (an unknown scheme fails here)
    if run.name in ("", FEATURES_DIR) or "/" in run.name:
        raise ValueError(f"run.name {run.name!r}: a run needs a folder name of its own "
                         f"(not empty, no '/', not {FEATURES_DIR!r}, the feature cache)")
