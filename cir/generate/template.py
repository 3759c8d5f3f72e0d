"""The `template` backend: modification texts derived from the two captions alone.

Shapes captions are parsed back into scenes, and the text names every difference
exactly (the embedded default's ground truth). Any other captions get a generic
caption diff in the spirit of CoLLM's text interpolation templates: the words that
change are named ("replace 'red' with 'blue'"), or, when the captions differ too much
for that to read well, the target caption is given outright.
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

import pyarrow as pa

from cir.generate.base import Backend, candidate_rows, triplet_rows

GENERATOR_SHAPES = "template:shapes"
GENERATOR_DIFF = "template:caption-diff"
MAX_DIFF_OPS = 3

_WORD = re.compile(r"[\w'-]+|[^\w\s]")


def _words(caption: str) -> list[str]:
    return _WORD.findall(caption.strip().rstrip(".").lower())


def _quote(words: list[str]) -> str:
    return "'" + " ".join(words) + "'"


def caption_diff_text(ref_caption: str, tgt_caption: str) -> str:
    """A modification text turning `ref_caption` into `tgt_caption` (generic captions)."""
    a, b = _words(ref_caption), _words(tgt_caption)
    ops = [op for op in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes()
           if op[0] != "equal"]
    if not ops or len(ops) > MAX_DIFF_OPS:
        return f"make it {tgt_caption.strip().rstrip('.')} instead of {ref_caption.strip().rstrip('.')}"
    parts = []
    for tag, i1, i2, j1, j2 in ops:
        if tag == "replace":
            parts.append(f"replace {_quote(a[i1:i2])} with {_quote(b[j1:j2])}")
        elif tag == "delete":
            parts.append(f"remove {_quote(a[i1:i2])}")
        else:
            parts.append(f"add {_quote(b[j1:j2])}")
    return ", ".join(parts)


def _shapes_texts(ref_caption: str, tgt_caption: str):
    """(forward, reverse) for two shapes captions, or None if either is not one."""
    from cir.data.edits import modification_texts
    from cir.data.shapes import parse_caption

    try:
        ref, tgt = parse_caption(ref_caption), parse_caption(tgt_caption)
    except ValueError:
        return None
    return modification_texts(ref, tgt)


def template_texts(ref_caption: str, tgt_caption: str) -> tuple[str, str, str]:
    """(forward text, reverse text, generator id) for two differing captions."""
    shapes = _shapes_texts(ref_caption, tgt_caption)
    if shapes is not None:
        return shapes[0], shapes[1], GENERATOR_SHAPES
    return caption_diff_text(ref_caption, tgt_caption), caption_diff_text(tgt_caption, ref_caption), GENERATOR_DIFF


@dataclass
class TemplateOptions:
    """The template backend has no options: its texts follow from the captions alone."""


class TemplateGenerator:
    """`map_batches` callable: one triplet per pair whose captions differ; pairs without
    captions are skipped."""

    def __call__(self, batch: pa.Table) -> pa.Table:
        keep, texts, reverses, generators = [], [], [], []
        refs = batch.column("ref_caption").to_pylist()
        tgts = batch.column("tgt_caption").to_pylist()
        for row, (ref, tgt) in enumerate(zip(refs, tgts)):
            if not ref or not tgt or ref.strip() == tgt.strip():
                continue
            forward, reverse, generator = template_texts(ref, tgt)
            generators.append(generator)
            keep.append(row)
            texts.append(forward)
            reverses.append(reverse)
        return candidate_rows(triplet_rows(batch, keep, texts, reverses, TemplateBackend.source, generators),
                              batch, keep)


class TemplateBackend(Backend):
    """One exact text and its reverse per pair; `generate.options` does not apply."""

    name = "template"
    source = "template"

    def apply(self, pairs):
        from cir.actor_pool import actor_pool

        return pairs.map_batches(TemplateGenerator, batch_size=self.batch_size, batch_format="pyarrow",
                                 **actor_pool(self.num_actors, num_cpus=1))
