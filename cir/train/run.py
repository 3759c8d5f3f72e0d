"""Driver side of `jobs/train.py`: examples, Ray Train `TorchTrainer`, stage chaining.

Layout under `run.storage`/`run.name`/ (a local folder, or a URI on any pyarrow
filesystem: `cir.storage`): one folder per stage holding Ray Train's checkpoints, `export/` (the stage's model: safetensors + JSON, what evaluation and
serving load), `history.json` and `curve.png`. Beside the runs, `run.storage`/features/
holds the frozen vision tower's embeddings of the benchmark images the stages use
(`cir.train.features`), shared by stages, reruns and runs on the same images and tower. A stage whose export exists is done;
re-running the job with the same name resumes the first unfinished stage from its
latest checkpoint.

Faults: Ray Train restarts a stage whose worker died or raised up to `run.max_failures`
times, each time from its latest checkpoint (the steps since it are computed again, the
same way); one more failure stops the job with `TrainingStopped`, which names the
failure and the checkpoint a rerun resumes from. Each stage's `data_order.json` shows
the steps it restored from and, per rank, each step's rows (`cir.train.loop`).
"""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import pyarrow as pa

from cir.embed import EmbedSettings
from cir.outputs import atomic_path, write_json_atomic
from cir.progress import log
from cir.storage import Location, Where, local_copy, resolve, upload
from cir.train.config import FEATURES_DIR, DataConfig, StageConfig, TrainConfig


def run_folder(cfg: TrainConfig) -> Where:
    """Where a run lives: one folder per stage below it, on a local disk or a bucket."""
    return resolve(cfg.run.storage) / cfg.run.name


def features_folder(cfg: TrainConfig) -> Where:
    """The feature cache of every run under `run.storage`."""
    return resolve(cfg.run.storage) / FEATURES_DIR


def load_train_benchmarks(data: DataConfig) -> list:
    """The annotated split(s) a benchmark stage trains on, through `cir.benchmarks`:
    shapes, CIRR, or one FashionIQ category (or all three)."""
    from cir.benchmarks import load_benchmark, load_fashioniq_all
    from cir.benchmarks.shapes import shapes_benchmark_root

    if data.benchmark == "shapes":
        return [load_benchmark("shapes", data.split, shapes_benchmark_root(data.benchmark_dir))]
    if data.benchmark == "fashioniq" and data.category == "all":
        return list(load_fashioniq_all(data.split, data.annotations, data.images).values())
    name = f"fashioniq-{data.category}" if data.benchmark == "fashioniq" else data.benchmark
    return [load_benchmark(name, data.split, data.annotations, data.images)]


def build_examples(data: DataConfig, vision: str, features: Where, embed: EmbedSettings | None = None) -> pa.Table:
    """A stage's training examples; benchmark images are encoded into `features`."""
    from cir.train import sources

    if data.source == "synth":
        return sources.synth_triplets(data.synth_dir, vision, data.limit)
    if data.source == "slerp":
        return sources.slerp_triplets(data.synth_dir, vision, data.slerp_alpha, data.synthetic_share,
                                      data.seed, data.limit)
    return sources.benchmark_triplets(load_train_benchmarks(data), vision, features, embed, data.limit)


def build_val(benchmark_dir: str, vision: str, split: str, limit: int, features: Where,
              embed: EmbedSettings | None = None) -> dict:
    """Features, texts and indices of a shapes split, for recall during training: the
    first `limit` queries against the split's whole gallery."""
    from cir.benchmarks import load_benchmark
    from cir.benchmarks.shapes import shapes_benchmark_root
    from cir.train.features import benchmark_features

    bench = load_benchmark("shapes", split, shapes_benchmark_root(benchmark_dir))
    f = benchmark_features(bench, bench.gallery_ids, vision, features, embed)
    if f.failed:
        raise ValueError(f"{bench.name} {split}: {len(f.failed)} gallery images could not be read")
    queries = bench.queries[:limit]
    gallery = f.vectors[[f.index[i] for i in bench.gallery_ids]]
    ref, tgt = bench.indices_of([q.ref_id for q in queries]), bench.indices_of([q.target_ids[0] for q in queries])
    return {"gallery": gallery, "ref_feats": gallery[ref], "ref_index": ref, "tgt_index": tgt,
            "texts": [q.text for q in queries]}


def schedule(n_examples: int, stage: StageConfig, world: int) -> tuple[int, int]:
    """(steps per epoch, total steps): every rank takes the same number of steps."""
    o = stage.optim
    per_step = world * o.micro_batch_size * o.grad_accum
    steps_per_epoch = n_examples // per_step
    if steps_per_epoch == 0:
        raise ValueError(f"stage {stage.name!r}: {n_examples} examples are fewer than one step "
                         f"needs ({world} workers x {o.micro_batch_size} x {o.grad_accum})")
    total = steps_per_epoch * o.epochs
    return steps_per_epoch, min(total, o.max_steps) if o.max_steps else total


def _use_gpu(setting) -> bool:
    import ray

    if setting == "auto":
        return ray.cluster_resources().get("GPU", 0) >= 1
    return bool(setting)


def run_stage(cfg: TrainConfig, stage: StageConfig, init_from: Where | None) -> Where:
    """Train one composer stage (or resume it); returns its export folder."""
    import ray

    from cir.train.loop import train_loop_per_worker

    stage_dir = run_folder(cfg) / stage.name
    claim_stage(stage_dir, stage_settings(cfg, stage, init_from))
    if (stage_dir / "export" / "config.json").is_file():
        log(f"stage {stage.name}: already exported at {stage_dir / 'export'}, skipping")
        return stage_dir / "export"
    vision, features = cfg.model.vision, features_folder(cfg)
    examples = build_examples(stage.data, vision, features, cfg.embed)
    val = None
    if cfg.run.eval_every and stage.data.benchmark == "shapes":
        val = ray.put(build_val(stage.data.benchmark_dir, vision, cfg.run.eval_split, cfg.run.eval_limit,
                                features, cfg.embed))
    from cir.raycluster import dataset_from_table

    n_blocks = max(cfg.run.num_workers * 4, examples.num_rows // 2048)
    dataset = dataset_from_table(examples, -(-examples.num_rows // n_blocks))
    return fit_stage(cfg, stage, init_from, dataset, examples.num_rows, val, train_loop_per_worker,
                     ("val_recall@1", "val_recall@10"))


def fit_stage(cfg, stage, init_from: Where | None, dataset, n_examples: int, val, loop, curve_metrics=(),
              extra: dict | None = None) -> Where:
    """Run `loop` on Ray Train over `dataset` (its "train" dataset, `n_examples` rows)
    and install the export of its last checkpoint, with `history.json`, `data_order.json`
    and `curve.png` beside it; `TrainingStopped` when it fails more than
    `run.max_failures` times. `cfg` has `model`, `run` and `deepspeed` sections; `extra`
    is added to the loop's config."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchTrainer

    run_dir = run_folder(cfg)
    stage_dir = run_dir / stage.name
    export = stage_dir / "export"
    steps_per_epoch, total = schedule(n_examples, stage, cfg.run.num_workers)
    log(f"stage {stage.name}: {n_examples} examples, "
        f"{steps_per_epoch} steps/epoch, {total} steps on {cfg.run.num_workers} workers")
    use_gpu = _use_gpu(cfg.run.use_gpu)
    trainer = TorchTrainer(
        loop,
        train_loop_config={
            "stage": asdict(stage), "run": asdict(cfg.run), "deepspeed": asdict(cfg.deepspeed),
            # a Location itself (it carries its filesystem's credentials; its str() does not)
            "model": asdict(cfg.model), "init_from": init_from,
            "total_steps": total, "steps_per_epoch": steps_per_epoch, "val": val, **(extra or {}),
        },
        scaling_config=ScalingConfig(num_workers=cfg.run.num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cfg.run.cpus_per_worker,
                                                           **({"GPU": 1} if use_gpu else {})}),
        run_config=RunConfig(name=stage.name, **train_storage(run_dir),
                             failure_config=FailureConfig(max_failures=cfg.run.max_failures)),
        datasets={"train": dataset},
        dataset_config=ingest_config(),
    )
    try:
        result = trainer.fit()
    except TrainingFailedError as exc:
        raise TrainingStopped(stopped_message(cfg, stage, exc, total)) from exc
    with result.checkpoint.as_directory() as folder:
        _install(Path(folder) / "export", export)
        history = json.loads((Path(folder) / "history.json").read_text())
        order = data_order(Path(folder))
    write_json_atomic(stage_dir / "history.json", history, sort_keys=False)
    write_json_atomic(stage_dir / "data_order.json", order, indent=None, sort_keys=False)
    if order["restored_from"]:
        log(f"stage {stage.name}: restored from the checkpoints of steps {order['restored_from']}")
    plot_curve(history, stage_dir / "curve.png", f"{cfg.run.name} / {stage.name}", curve_metrics)
    log(f"stage {stage.name}: exported to {export}")
    return export


class TrainingStopped(RuntimeError):
    """A stage failed more often than `run.max_failures` allows (or with an error Ray
    Train does not retry). Its checkpoints stay: rerunning the job with the same run
    name resumes from the latest."""


def latest_checkpoint_step(cfg, stage) -> int | None:
    """The step of a stage's latest checkpoint that Ray Train registered (what a rerun
    resumes from), or None when it has none."""
    from ray.train import Result

    storage = train_storage(run_folder(cfg) / stage.name)
    try:
        result = Result.from_path(storage["storage_path"], storage.get("storage_filesystem"))
    except RuntimeError:            # no run folder, or no checkpoint registered in it
        return None
    return result.metrics["step"] if result.checkpoint is not None else None


def stopped_message(cfg, stage, exc, total: int) -> str:
    """What failed, and what a rerun does about it."""
    failures = getattr(exc, "worker_failures", None) or {}
    what = "; ".join(f"rank {rank}: {_describe(error)}" for rank, error in sorted(failures.items())) \
        or _describe(getattr(exc, "controller_failure", exc))
    step = latest_checkpoint_step(cfg, stage)
    if step is None:
        rerun = (f"It had written no checkpoint yet (run.checkpoint_every={cfg.run.checkpoint_every}): "
                 "rerunning the same command starts it from step 0")
    else:
        rerun = (f"Its latest checkpoint is step {step} of {total}: rerunning the same command (run name "
                 f"{cfg.run.name!r}) resumes from checkpoint step {step}, and no step is lost or repeated")
    return (f"stage {stage.name!r} failed and Ray Train restarts it no more "
            f"(run.max_failures={cfg.run.max_failures}): {what}. {rerun}.")


def _describe(error: BaseException) -> str:
    """`Type: first line`, and what a failed health check of Ray Train found (a dead
    worker's ActorDiedError, under a message that says only that the check failed)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = f"{type(error).__name__}: {lines[0].rstrip('.') if lines else '(no message)'}"
    found = getattr(error, "health_check_failure", None)
    return f"{text} ({_describe(found)})" if found is not None else text


def data_order(checkpoint: Path) -> dict:
    """The steps a stage restored from and each rank's [step, rows' CRC-32] list, out
    of its final checkpoint."""
    state = json.loads((checkpoint / "train_state.json").read_text())
    ranks = sorted(int(p.name.split(".")[1]) for p in checkpoint.glob("data_order.*.json"))
    return {"restored_from": state.get("restored_from", []),
            "steps": {str(r): json.loads((checkpoint / f"data_order.{r}.json").read_text()) for r in ranks}}


def train_storage(run_dir: Where) -> dict:
    """RunConfig's storage arguments: Ray Train writes the checkpoints there itself."""
    if isinstance(run_dir, Location):
        return {"storage_path": run_dir.path, "storage_filesystem": run_dir.fs}
    return {"storage_path": str(run_dir)}


def init_weights(init_from) -> str:
    """The safetensors file of the export a stage starts from, on this node's disk (a
    bucket's export is copied into the local cache once per node)."""
    return str(local_copy(init_from, "the previous stage's export") / "model.safetensors")


def ingest_config():
    """Ray Train's split of the train dataset among the workers, in order, so that each
    worker gets the same rows on any cluster layout and after a restore (Train's default
    hands blocks to the worker on the node that holds them)."""
    import ray.train

    options = ray.train.DataConfig.default_ingest_options()
    options.preserve_order = True
    return ray.train.DataConfig(execution_options=options)


def stage_settings(cfg: TrainConfig, stage: StageConfig, init_from: Where | None) -> dict:
    """What a stage's checkpoints and export depend on (JSON-normalised)."""
    return json.loads(json.dumps({
        "model": asdict(cfg.model), "stage": asdict(stage), "deepspeed": asdict(cfg.deepspeed),
        "num_workers": cfg.run.num_workers, "init_from": str(init_from) if init_from else None,
    }))


def claim_stage(stage_dir: Where, settings: dict) -> None:
    """Tie a stage folder to its settings: re-running a run name with other settings
    would otherwise resume from (or skip to) a model trained with the old ones."""
    path = stage_dir / "settings.json"
    if path.is_file():
        old = json.loads(path.read_text())
        if old != settings:
            changed = sorted(k for k in settings.keys() | old.keys() if old.get(k) != settings.get(k))
            raise ValueError(
                f"{stage_dir} was trained with other settings ({', '.join(changed)} differ); "
                "use another run name (--name) or delete that folder to start over")
        return
    write_json_atomic(path, settings, sort_keys=False)


def _install(src: Path, dst: Where) -> None:
    """Copy a finished export into place: locally by a rename; on a bucket, which has
    none, file by file with config.json (what marks an export done) uploaded last."""
    if isinstance(dst, Path):
        with atomic_path(dst) as tmp:
            shutil.copytree(src, tmp)
        return
    dst.rmtree()
    files = sorted((p for p in src.rglob("*") if p.is_file()), key=lambda p: p.name == "config.json")
    for f in files:
        upload(f, dst / f.relative_to(src).as_posix())


def plot_curve(history: list[dict], path: Where, title: str, metrics=("val_recall@1", "val_recall@10")) -> None:
    """Train loss, and the validation `metrics` (percent) on a second axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for key, colour, label in (("loss", "tab:blue", "train loss"), ("val_loss", "tab:cyan", "val loss")):
        pts = [(h["step"], h[key]) for h in history if key in h]
        if pts:
            ax.plot(*zip(*pts), color=colour, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    shown = [m for m in metrics if any(m in h for h in history)]
    if shown:
        ax2 = ax.twinx()
        for name, colour in zip(shown, ("tab:orange", "tab:green", "tab:red", "tab:purple")):
            pts = [(h["step"], h[name]) for h in history if name in h]
            ax2.plot(*zip(*pts), color=colour, marker="o", label=name.replace("val_", "val "))
        ax2.set_ylabel("%")
        ax2.legend(loc="center right")
    ax.legend(loc="upper right")
    ax.set_title(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def check_run_settings(cfg: TrainConfig) -> None:
    """Refuse, before any work, a run name whose stages were trained with other settings."""
    init_from = None
    for stage in cfg.stages:
        stage_dir = run_folder(cfg) / stage.name
        if (stage_dir / "settings.json").is_file():
            claim_stage(stage_dir, stage_settings(cfg, stage, init_from))
        init_from = stage_dir / "export"


def run_training(cfg: TrainConfig) -> Where:
    """All stages in order, each from the previous stage's export; returns the last."""
    init_from = None
    for stage in cfg.stages:
        init_from = run_stage(cfg, stage, init_from)
    return init_from
