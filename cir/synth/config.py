"""Configuration of `jobs/synth.py` (YAML in `configs/`, overridable by flags)."""
from __future__ import annotations

from dataclasses import dataclass, field

from cir.embed import EmbedSettings
from cir.generate.template import TemplateOptions
from cir.mining import MiningConfig


@dataclass
class ShapesCorpusConfig:
    n_images: int = 2000
    seed: int = 0
    image_size: int = 64
    family_size: int = 8


@dataclass
class CorpusConfig:
    # "shapes" (generated), or a path: an image folder (captions.jsonl/.csv beside the
    # images) or a Parquet corpus (a .parquet file or a folder of them).
    source: str = "shapes"
    shapes: ShapesCorpusConfig = field(default_factory=ShapesCorpusConfig)


@dataclass
class EncodeConfig(EmbedSettings):
    model: str = "cir-tiny"


@dataclass
class MineConfig:
    k: int = 10
    band: list[float] = field(default_factory=lambda: [0.5, 0.99])
    max_pairs_per_image: int = 3
    same_category: bool = False
    keep_both_directions: bool = False
    exact_limit: int = 50_000
    nprobe: int = 16

    def mining(self) -> MiningConfig:
        if len(self.band) != 2:
            raise ValueError(f"mine.band must be [lo, hi], got {self.band}")
        return MiningConfig(
            k=self.k, lo=self.band[0], hi=self.band[1],
            max_pairs_per_image=self.max_pairs_per_image,
            same_category=self.same_category,
            keep_both_directions=self.keep_both_directions,
            exact_limit=self.exact_limit, nprobe=self.nprobe,
        )


@dataclass
class GenerateConfig:
    backend: str = "template"
    batch_size: int = 256
    num_actors: int = 1
    # One typed section of options per backend (cir.generate.BACKENDS); only the chosen
    # backend's section is used, and it is part of the triplets stage's fingerprint.
    template: TemplateOptions = field(default_factory=TemplateOptions)

    def options(self):
        return getattr(self, self.backend)


@dataclass
class SynthConfig:
    output: str = "outputs/synth-local"
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    encode: EncodeConfig = field(default_factory=EncodeConfig)
    mine: MineConfig = field(default_factory=MineConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    rows_per_file: int = 50_000

    def validate(self) -> None:
        """Checks that need no data: fail before any work starts."""
        from cir.encoders import validate_encoder_name
        from cir.generate import build_backend

        validate_encoder_name(self.encode.model)
        self.encode.validate("encode")
        self.mine.mining().validate()
        for name, value in [("generate.batch_size", self.generate.batch_size),
                            ("generate.num_actors", self.generate.num_actors),
                            ("corpus.shapes.n_images", self.corpus.shapes.n_images)]:
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        build_backend(self.generate).validate()
