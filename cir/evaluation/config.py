"""Settings of an eval run: `EvalConfig` and its parts, and the defaults they name."""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cir.benchmarks.shapes import ShapesBenchmarkConfig
from cir.embed import EmbedSettings
from cir.storage import Where, resolve

# The default image/text encoder of every eval run: the only place it is named.
DEFAULT_ENCODER = "cir-tiny"
DEFAULT_OUTPUT_ROOT = "outputs/eval"
# Split used when none is given.
DEFAULT_SPLITS = {"shapes": "test"}
FALLBACK_SPLIT = "val"
FILE_BENCHMARKS = ("cirr", "circo", "fashioniq")  # need --annotations (and --images for a model)


@dataclass
class EncodeSettings(EmbedSettings):
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
    shapes: ShapesBenchmarkConfig = field(default_factory=ShapesBenchmarkConfig)
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

    def output_dir(self) -> Where:
        if self.output:
            return resolve(self.output)
        what = self.model if self.mode == "model" else "predictions-" + Path(self.predictions).stem
        if self.mode == "model" and self.model.startswith("baseline:"):
            what += "-" + self.encoder
        slug = re.sub(r"[^A-Za-z0-9._-]+", "-", what).strip("-")
        return Path(DEFAULT_OUTPUT_ROOT) / f"{self.benchmark}-{self.resolved_split}-{slug}"

    def validate(self) -> None:
        """Checks that need no data and no Ray."""
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        self.encode.validate("encode")
        if self.encode.rows_per_block < 1:
            raise ValueError(f"encode.rows_per_block must be >= 1, got {self.encode.rows_per_block}")
        if self.subset_predictions and not self.predictions:
            raise ValueError("--subset-predictions needs --predictions")
        if self.output:
            resolve(self.output)      # a local folder or a URI pyarrow can open (an unknown scheme fails here)


def config_dict(cfg: EvalConfig) -> dict:
    return asdict(cfg)
