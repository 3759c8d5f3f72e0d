"""Configuration of `jobs/synth.py` (YAML in `configs/`, overridable by flags)."""
from __future__ import annotations

from dataclasses import dataclass, field

from cir.embed import EmbedSettings
from cir.generate.hf import HFOptions
from cir.generate.http import HttpOptions
from cir.generate.llm import TextTaskOptions
from cir.generate.mtst import MTSTOptions
from cir.generate.quality import FilterConfig
from cir.generate.template import TemplateOptions
from cir.generate.vllm import VLLMOptions
from cir.synth.captions import CaptionsConfig
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
    # Generate for at most this many pairs (0: all), a stable sample by pair id: an LLM
    # is costly, so try a prompt on a few hundred pairs first.
    max_pairs: int = 0
    # What the LLM backends write and how they sample (cir.generate.llm).
    options: TextTaskOptions = field(default_factory=TextTaskOptions)
    # One typed section of options per backend (cir.generate.BACKENDS); only the chosen
    # backend's section is used, and it is part of the triplets stage's fingerprint.
    template: TemplateOptions = field(default_factory=TemplateOptions)
    hf: HFOptions = field(default_factory=HFOptions)
    http: HttpOptions = field(default_factory=HttpOptions)
    vllm: VLLMOptions = field(default_factory=VLLMOptions)
    mtst: MTSTOptions = field(default_factory=MTSTOptions)

    def backend_options(self):
        from cir.generate import BACKENDS

        if self.backend not in BACKENDS:
            raise ValueError(f"unknown text-generation backend {self.backend!r}; known: {', '.join(sorted(BACKENDS))}")
        return getattr(self, self.backend)


@dataclass
class SynthConfig:
    output: str = "outputs/synth-local"
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    # Fill missing captions before anything reads them (cir.synth.captions); off by default.
    captions: CaptionsConfig = field(default_factory=CaptionsConfig)
    encode: EncodeConfig = field(default_factory=EncodeConfig)
    mine: MineConfig = field(default_factory=MineConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
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
        if self.generate.max_pairs < 0:
            raise ValueError(f"generate.max_pairs must be >= 0 (0: all pairs), got {self.generate.max_pairs}")
        self.filter.validate()
        self.captions.validate()
        build_backend(self.generate).validate()
