"""Settings of an eval run: `EvalConfig` and its parts, and the defaults they name."""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

# The default image/text encoder of every eval run: the only place it is named.
DEFAULT_ENCODER = "cir-tiny"
DEFAULT_SHAPES_DIR = "outputs/shapes-benchmark"
DEFAULT_OUTPUT_ROOT = "outputs/eval"
# Split used when none is given.
DEFAULT_SPLITS = {"shapes": "test"}
FALLBACK_SPLIT = "val"
FILE_BENCHMARKS = ("cirr", "circo", "fashioniq")  # need --annotations (and --images for a model)


@dataclass
class ShapesDataConfig:
    """The shapes benchmark written on first use when no `data` folder is given."""

    seed: int = 1
    n_train: int = 1000
    n_val: int = 500
    n_test: int = 500
    image_size: int = 64


@dataclass
class EncodeSettings:
    batch_size: int = 64
    num_actors: int = 1
    cpus_per_actor: float = 1.0
    # GPUs per encoder actor ("auto": 1 when the cluster has GPUs, else 0).
    gpus_per_actor: float | str = "auto"
    # Torch threads inside each actor; 0: the node's cores shared among the actors.
    torch_threads: int = 0
    precision: str = "fp32"  # bf16 on GPUs
    rows_per_block: int = 512


@dataclass
class EvalConfig:
    benchmark: str = "shapes"  # shapes | cirr | fashioniq | fashioniq-<category> | circo | registered
    split: str = ""  # "" -> shapes: test, others: val
    model: str = "baseline:sum"  # baseline:image-only|text-only|sum, checkpoint:PATH
    encoder: str = DEFAULT_ENCODER  # open_clip encoder of the baselines
    annotations: str | None = None  # annotation folder of cirr / fashioniq / circo
    images: str | None = None  # image folder (needed to encode a real benchmark's gallery)
    data: str | None = None  # shapes benchmark folder; None -> outputs/shapes-benchmark
    shapes: ShapesDataConfig = field(default_factory=ShapesDataConfig)
    predictions: str | None = None  # score this file instead of running a model
    subset_predictions: str | None = None  # CIRR recall_subset rankings (optional)
    output: str | None = None  # None -> outputs/eval/<benchmark>-<split>-<model>
    k: int = 50  # ranked ids kept per query (metrics need 50)
    encode: EncodeSettings = field(default_factory=EncodeSettings)

    @property
    def resolved_split(self) -> str:
        return self.split or DEFAULT_SPLITS.get(self.benchmark, FALLBACK_SPLIT)

    @property
    def mode(self) -> str:
        return "predictions" if self.predictions else "model"

    def output_dir(self) -> Path:
        if self.output:
            return Path(self.output)
        what = self.model if self.mode == "model" else "predictions-" + Path(self.predictions).stem
        if self.mode == "model" and self.model.startswith("baseline:"):
            what += "-" + self.encoder
        slug = re.sub(r"[^A-Za-z0-9._-]+", "-", what).strip("-")
        return Path(DEFAULT_OUTPUT_ROOT) / f"{self.benchmark}-{self.resolved_split}-{slug}"

    def validate(self) -> None:
        """Checks that need no data and no Ray."""
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        e = self.encode
        if e.batch_size < 1 or e.num_actors < 1 or e.rows_per_block < 1:
            raise ValueError("encode.batch_size, encode.num_actors and encode.rows_per_block must be >= 1")
        if not 0 < e.cpus_per_actor <= 64:
            raise ValueError(f"encode.cpus_per_actor must be in (0, 64], got {e.cpus_per_actor}")
        if isinstance(e.gpus_per_actor, str) and e.gpus_per_actor != "auto":
            raise ValueError(f"encode.gpus_per_actor must be a number or 'auto', got {e.gpus_per_actor!r}")
        if e.precision not in ("fp32", "bf16"):
            raise ValueError(f"encode.precision must be fp32 or bf16, got {e.precision!r}")
        if self.subset_predictions and not self.predictions:
            raise ValueError("--subset-predictions needs --predictions")


def config_dict(cfg: EvalConfig) -> dict:
    return asdict(cfg)
