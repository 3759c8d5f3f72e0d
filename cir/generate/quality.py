"""The quality filter of generated texts (the synth config's `filter` section).

Each candidate triplet gets a `drop_reason`, the first that applies, or "" if kept:

    empty           the answer held no text
    too_short       fewer than `min_words` words
    too_long        more than `max_words` words (an answer cut off, or a description)
    copies_caption  word-level similarity to either caption above `max_caption_similarity`
    duplicate       repeats an earlier text of the same pair (case and punctuation aside)
    direction       cosine between the text's embedding (the synth encoder's text tower)
                    and the pair's normalised (target - reference) image embedding below
                    `min_direction_score`

A reverse text that fails the text checks becomes null rather than dropping its row.
The filter is on by default for the LLM and `mtst` backends and off for `template`
(whose texts are exact); when off, only empty texts are dropped and nothing is counted. The direction check needs a threshold
and an encoder with trained weights: a random text tower scores noise.
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from cir.schemas import embedding_array, embedding_matrix

GENERATED = ("llm", "mtst")  # sources whose texts the filter checks unless told otherwise
REASONS = ("empty", "too_short", "too_long", "copies_caption", "duplicate", "direction")
KEPT = ""
_WORD = re.compile(r"[\w'-]+")


def normalise(text: str) -> str:
    """The text as the duplicate check compares it."""
    return " ".join(_WORD.findall((text or "").lower()))


@dataclass
class FilterConfig:
    enabled: bool | None = None        # None: on for LLM backends, off for template
    min_words: int = 2
    max_words: int = 25
    max_caption_similarity: float = 0.8
    min_direction_score: float | None = None   # None: no direction check

    def validate(self) -> None:
        if self.min_words < 1 or self.max_words < self.min_words:
            raise ValueError(f"filter needs 1 <= min_words <= max_words, got {self.min_words}, {self.max_words}")
        if not 0 < self.max_caption_similarity <= 1:
            raise ValueError(f"filter.max_caption_similarity must be in (0, 1], got {self.max_caption_similarity}")
        if self.min_direction_score is not None and not -1 <= self.min_direction_score <= 1:
            raise ValueError(f"filter.min_direction_score must be in [-1, 1], got {self.min_direction_score}")

    def active(self, source: str) -> bool:
        return self.enabled if self.enabled is not None else source in GENERATED


def caption_similarity(text: str, caption: str) -> float:
    a, b = normalise(text).split(), normalise(caption).split()
    if not a or not b:
        return 0.0
    return difflib.SequenceMatcher(a=a, b=b, autojunk=False).ratio()


def text_reason(text: str, ref_caption: str, tgt_caption: str, cfg: FilterConfig) -> str:
    """The first text check that `text` fails, or KEPT."""
    words = normalise(text).split()
    if not words:
        return "empty"
    if len(words) < cfg.min_words:
        return "too_short"
    if len(words) > cfg.max_words:
        return "too_long"
    if max(caption_similarity(text, c or "") for c in (ref_caption, tgt_caption)) > cfg.max_caption_similarity:
        return "copies_caption"
    return KEPT


class QualityFilter:
    """`map_batches` callable over candidate triplets (`cir.generate.llm.PairTexts`): adds
    `drop_reason` and `direction_score` (null where not computed)."""

    def __init__(self, cfg: FilterConfig, encoder: str | None = None, threads: int = 0):
        self.cfg = cfg
        self.encoder = None
        if cfg.min_direction_score is not None and encoder:
            from cir.encoders import ClipEncoder

            self.encoder = ClipEncoder(encoder, threads=threads or None)

    def __call__(self, batch: pa.Table) -> pa.Table:
        texts = batch.column("text").to_pylist()
        refs = batch.column("ref_caption").to_pylist()
        tgts = batch.column("tgt_caption").to_pylist()
        repeats = batch.column("repeats").to_pylist()
        reasons = []
        for text, ref, tgt, repeat in zip(texts, refs, tgts, repeats):
            reason = text_reason(text, ref, tgt, self.cfg)
            reasons.append(reason or ("duplicate" if repeat else KEPT))
        reverse = [r if r is not None and text_reason(r, tgt, ref, self.cfg) == KEPT else None
                   for r, ref, tgt in zip(batch.column("reverse_text").to_pylist(), refs, tgts)]
        scores = [None] * len(texts)
        if self.encoder is not None and "direction" in batch.column_names:
            todo = [i for i, r in enumerate(reasons) if r == KEPT]
            if todo:
                directions = embedding_matrix(batch.column("direction").take(pa.array(todo, type=pa.int64())))
                cos = (self.encoder.encode_texts([texts[i] for i in todo]) * directions).sum(axis=1)
                for i, score in zip(todo, cos):
                    scores[i] = float(score)
                    if score < self.cfg.min_direction_score:
                        reasons[i] = "direction"
        return self._finish(batch, reasons, scores, reverse)

    @staticmethod
    def _finish(batch: pa.Table, reasons, scores, reverse) -> pa.Table:
        i = batch.column_names.index("reverse_text")
        batch = batch.set_column(i, "reverse_text", pa.array(reverse, type=pa.string()))
        batch = batch.append_column("drop_reason", pa.array(reasons, type=pa.string()))
        return batch.append_column("direction_score", pa.array(scores, type=pa.float32()))


def pair_directions(ref_ids, tgt_ids, ids, vectors: np.ndarray) -> pa.Array:
    """Normalised (target - reference) embeddings for pairs, as a list<float32> column."""
    index = {image_id: i for i, image_id in enumerate(ids)}
    delta = vectors[[index[t] for t in tgt_ids]] - vectors[[index[r] for r in ref_ids]]
    delta /= np.maximum(np.linalg.norm(delta, axis=1, keepdims=True), 1e-8)
    return embedding_array(delta.astype(np.float32))
