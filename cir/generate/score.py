"""Exact accuracy of the texts that generators write on the shapes world (the checker
of `cir.data.edit_parse`), beside the baselines MTST's claim is measured against.

* Modification texts for a sample of mined pairs of a synth output: a trained
  generator (through the `mtst` backend's actor pool, so what is scored is what the
  synth job writes), the `template` backend (an upper bound for a caption-based text)
  and a trivial baseline (one text for every pair: the most common annotated one).
  Forward and reverse texts, overall and by the number of edits between the images.
* Captions of held-out corpus images: a trained captioner (the synth job's `captions`
  step callable) against the most common caption.
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa

EDIT_BUCKETS = ("1", "2", "3", "4+")


def most_common(texts) -> str:
    texts = [t for t in texts if t]
    if not texts:
        raise ValueError("no texts to take the most common one of")
    return Counter(texts).most_common(1)[0][0]


def edit_bucket(ref_caption: str, tgt_caption: str) -> str:
    from cir.data.edits import diff
    from cir.data.shapes import parse_caption

    n = len(diff(parse_caption(ref_caption), parse_caption(tgt_caption)))
    return str(n) if n < 4 else "4+"


def exact_share(oks, buckets) -> dict:
    """{"all": %, "1": %, ..., "n": {bucket: count}} of a list of booleans."""
    oks, buckets = np.asarray(oks, bool), np.asarray(buckets)
    out = {"all": 100.0 * float(oks.mean()) if len(oks) else float("nan")}
    for b in EDIT_BUCKETS:
        sel = buckets == b
        out[b] = 100.0 * float(oks[sel].mean()) if sel.any() else None
    out["n"] = {b: int((buckets == b).sum()) for b in EDIT_BUCKETS}
    return out


def scored_pairs(synth_dir, n: int) -> tuple[pa.Table, list[str]]:
    """(pairs with captions, corpus files) of a synth output: a stable sample of `n` of
    its mined pairs whose captions differ."""
    from pathlib import Path

    from cir.data import corpus as corpus_io
    from cir.outputs import read_table
    from cir.synth.pipeline import sample_pairs, with_captions
    from cir.train.generator_data import synth_corpus_files

    corpus = synth_corpus_files(Path(synth_dir))
    pairs = with_captions(read_table(Path(synth_dir) / "pairs"), corpus_io.read_captions(corpus))
    differ = [bool(a and b and a != b) for a, b in zip(pairs.column("ref_caption").to_pylist(),
                                                        pairs.column("tgt_caption").to_pylist())]
    pairs = pairs.filter(pa.array(differ))
    if not pairs.num_rows:
        raise ValueError(f"{synth_dir}: no mined pair with two different captions to score")
    return sample_pairs(pairs, n), corpus


def generator_texts(export: str, pairs: pa.Table, corpus: list[str], batch_size: int = 64,
                    num_actors: int = 1, prompt: str | None = None) -> tuple[list[str | None], list[str | None]]:
    """(forward, reverse) texts of a trained generator for `pairs`, in pair order: the
    `mtst` backend's actor pool (after `prompt`, None: the export's own), without the
    synth job's quality filter."""
    import ray

    from cir.generate.mtst import MTSTBackend, MTSTOptions

    backend = MTSTBackend(MTSTOptions(model=export, prompt=prompt), batch_size, num_actors)
    backend.validate()
    backend.check_cluster()
    backend.corpus_files = corpus
    written = _columns(backend.apply(ray.data.from_arrow(pairs)), ("ref_id", "tgt_id", "text", "reverse_text"))
    by_pair = {(r, t): (f, b) for r, t, f, b in zip(*written)}
    keys = list(zip(pairs.column("ref_id").to_pylist(), pairs.column("tgt_id").to_pylist()))
    return [by_pair.get(k, (None, None))[0] for k in keys], [by_pair.get(k, (None, None))[1] for k in keys]


def score_modification(pairs: pa.Table, methods: dict[str, tuple[list, list]]) -> dict:
    """{method: {"forward": exact_share, "reverse": exact_share}}; `methods` maps a
    name to its (forward, reverse) texts in pair order (None: no text, wrong)."""
    from cir.data.edit_parse import is_exact

    ref, tgt = pairs.column("ref_caption").to_pylist(), pairs.column("tgt_caption").to_pylist()
    forward_buckets = [edit_bucket(a, b) for a, b in zip(ref, tgt)]
    out = {}
    for name, (forward, reverse) in methods.items():
        ok_f = [bool(t) and is_exact("modification", t, a, b) for t, a, b in zip(forward, ref, tgt)]
        ok_r = [bool(t) and is_exact("modification", t, b, a) for t, a, b in zip(reverse, ref, tgt)]
        out[name] = {"forward": exact_share(ok_f, forward_buckets), "reverse": exact_share(ok_r, forward_buckets)}
    return out


def template_texts_of(pairs: pa.Table) -> tuple[list[str], list[str]]:
    from cir.generate.template import template_texts

    texts = [template_texts(a, b)[:2] for a, b in zip(pairs.column("ref_caption").to_pylist(),
                                                      pairs.column("tgt_caption").to_pylist())]
    return [t[0] for t in texts], [t[1] for t in texts]


def score_captions(export: str, corpus: list[str], n: int, batch_size: int = 64, num_actors: int = 1) -> dict:
    """Exact-caption accuracy (%) of a captioner on `n` images of `corpus` (their
    captions are the truth), beside the most common of those captions."""
    import ray

    from cir.data.edit_parse import is_exact
    from cir.synth.captions import CaptionsConfig, GeneratorCaptioner
    from cir.synth.config import FilterConfig

    truth = ray.data.read_parquet(corpus).limit(n).materialize()
    cfg = CaptionsConfig(captioner="generator", model=export, overwrite=True, batch_size=batch_size)
    cfg.validate()
    # The captioner is scored, not the quality filter: its 25-word cap would null every
    # four-object shapes caption (26-30 words) and count it wrong.
    no_filter = FilterConfig(min_words=1, max_words=10**6)
    written = truth.map_batches(GeneratorCaptioner, fn_constructor_args=(cfg, no_filter),
                                batch_size=batch_size, batch_format="pyarrow",
                                compute=ray.data.ActorPoolStrategy(size=num_actors))
    want = dict(zip(*_columns(truth, ("image_id", "caption"))))
    got = dict(zip(*_columns(written, ("image_id", "caption"))))
    ids = sorted(want)
    trivial = most_common(want.values())
    return {"n": len(ids),
            "captioner": 100.0 * float(np.mean([bool(got.get(i)) and is_exact("caption", got[i], want[i])
                                                for i in ids])),
            "most common caption": 100.0 * float(np.mean([is_exact("caption", trivial, want[i]) for i in ids])),
            "examples": [(want[i], got.get(i)) for i in ids[:3]]}


def _columns(ds, names) -> list[list]:
    """Columns of a Ray Dataset as lists (an empty dataset: empty lists)."""
    import ray

    tables = [t for t in ray.get(ds.select_columns(list(names)).to_arrow_refs()) if t.num_rows]
    if not tables:
        return [[] for _ in names]
    table = pa.concat_tables(tables)
    return [table.column(c).to_pylist() for c in names]
