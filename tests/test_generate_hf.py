"""The `hf` backend: a tiny chat model built in code, and the real SmolLM2 (slow)."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest
from tiny_llm import MODIFY_ANSWER, MODIFY_TEXTS, REVERSE_ANSWER, training_conversations

from cir.generate import build_backend
from cir.generate.hf import ChatModel, converted_gguf, gguf_path
from cir.generate.parse import parse_texts
from cir.outputs import read_table
from cir.synth.config import GenerateConfig
from cir.synth.pipeline import SynthRun

from conftest import copy_mined, shapes_synth_config as make_config

REF = "a small red circle at the top left, a large blue square in the centre"
TGT = "a small blue circle at the top left, a large blue square in the centre"


def pair_rows(n: int) -> pa.Table:
    from cir.data.shapes import caption, random_scene
    import numpy as np

    rng = np.random.default_rng(3)
    caps = [caption(random_scene(rng)) for _ in range(n + 1)]
    return pa.table({
        "pair_id": [f"p{i}" for i in range(n)], "ref_id": [f"i{i}" for i in range(n)],
        "tgt_id": [f"i{i + 1}" for i in range(n)], "similarity": pa.array([0.9] * n, pa.float32()),
        "ref_caption": caps[:n], "tgt_caption": caps[1:],
    })


def test_batched_left_padded_answers_equal_one_at_a_time(tiny_chat_model):
    model = ChatModel(str(tiny_chat_model))
    convs = [c for c, _ in training_conversations(6, seed=11)]   # modify and reverse, mixed lengths
    batched, counts = model.chat(convs, max_new_tokens=40)
    single = [model.chat([c], max_new_tokens=40)[0][0] for c in convs]
    assert batched == single
    assert [parse_texts(a) for a in batched[::2]] == [MODIFY_TEXTS] * 3
    assert [parse_texts(a) for a in batched[1::2]] == [[REVERSE_ANSWER]] * 3
    assert all(0 < c <= 40 for c in counts)


def test_max_new_tokens_bounds_the_answer(tiny_chat_model):
    model = ChatModel(str(tiny_chat_model))
    texts, counts = model.chat([training_conversations(1)[0][0]], max_new_tokens=3)
    assert counts == [3] and len(texts[0].split()) <= 3 < len(MODIFY_ANSWER.split())


def test_backend_writes_several_texts_and_reverse_texts_per_pair(ray_session, tiny_chat_model):
    import ray

    g = GenerateConfig(backend="hf", batch_size=4)
    g.hf.model = str(tiny_chat_model)
    backend = build_backend(g)
    backend.validate()
    rows = backend.apply(ray.data.from_arrow(pair_rows(5))).take_all()
    assert len(rows) == 5 * 3
    assert {r["text"] for r in rows} == set(MODIFY_TEXTS)
    assert {r["reverse_text"] for r in rows} == {REVERSE_ANSWER}
    assert len({r["triplet_id"] for r in rows}) == 15
    assert {r["generator"] for r in rows} == {f"hf:{Path(tiny_chat_model).name}@modify.v1+reverse.v1"}
    assert sum(r["repeats"] for r in rows) == 5           # the second text repeats the first
    assert {r["source"] for r in rows} == {"llm"}


def test_no_reverse_texts_when_not_asked(ray_session, tiny_chat_model):
    import ray

    g = GenerateConfig(backend="hf", batch_size=8)
    g.hf.model, g.options.reverse, g.options.texts_per_pair = str(tiny_chat_model), False, 2
    backend = build_backend(g)
    rows = backend.apply(ray.data.from_arrow(pair_rows(3))).take_all()
    assert len(rows) == 6 and {r["reverse_text"] for r in rows} == {None}
    assert backend.generator_id().endswith("@modify.v1")


@pytest.fixture(scope="module")
def hf_synth(shapes_synth, tiny_chat_model, tmp_path_factory):
    out = copy_mined(shapes_synth[0], tmp_path_factory.mktemp("synth-hf") / "out")
    cfg = make_config(out, generate__backend="hf", generate__hf__model=str(tiny_chat_model),
                      generate__batch_size=32, filter__min_words=3)
    return out, cfg, SynthRun(cfg).run()


def test_synth_with_hf_filters_and_counts(hf_synth):
    out, cfg, summary = hf_synth
    pairs = read_table(out / "pairs").num_rows
    counts = summary.stages["triplets"].extra["filter"]
    # Per pair the tiny model writes a text, its duplicate and a two-word text.
    assert counts == {"candidates": 3 * pairs, "kept": pairs, "dropped": {"duplicate": pairs, "too_short": pairs},
                      "kept_without_reverse_text": 0}
    triplets = read_table(out / "triplets")
    assert triplets.num_rows == pairs and set(triplets.column("text").to_pylist()) == {MODIFY_TEXTS[0]}
    assert set(triplets.column("reverse_text").to_pylist()) == {REVERSE_ANSWER}
    manifest = json.loads((out / "triplets" / "_SUCCESS.json").read_text())
    assert manifest["extra"]["filter"] == counts
    rejected = read_table(out / "rejected")
    assert sorted(set(rejected.column("drop_reason").to_pylist())) == ["duplicate", "too_short"]
    assert "direction" not in rejected.column_names      # the pair's image vector is internal


def test_synth_with_hf_resumes(hf_synth):
    out, cfg, first = hf_synth
    again = SynthRun(cfg).run()
    assert all(r.skipped for r in again.stages.values())
    assert again.stages["triplets"].extra == first.stages["triplets"].extra


def test_bad_hf_options_are_refused_before_any_work(tmp_path):
    for key, value, match in [("generate.hf.model", str(tmp_path / "missing.gguf"), "no GGUF file"),
                              ("generate.hf.model", str(tmp_path / "no-such-model"), "is not a folder"),
                              ("generate.hf.dtype", "int3", "dtype"),
                              ("generate.options.texts_per_pair", 0, "texts_per_pair"),
                              ("generate.options.prompt", "modify.v9", "unknown prompt")]:
        cfg = make_config(tmp_path / "out", generate__backend="hf", **{key.replace(".", "__"): value})
        with pytest.raises(ValueError, match=match):
            SynthRun(cfg)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_smollm2_writes_parsed_texts_from_its_safetensors_cache(tmp_path):
    model = ChatModel("smollm2", cache_dir=str(tmp_path / "cache"))
    folder = converted_gguf(gguf_path("smollm2"), tmp_path / "cache")   # the one the model loaded
    assert (folder / "model.safetensors").is_file() and not list(tmp_path.glob("cache/.*tmp-*"))
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    from cir.generate.prompting import load_prompt

    answers, counts = model.chat([load_prompt("modify.v1").render(REF, TGT, 3)], max_new_tokens=64)
    texts = parse_texts(answers[0])
    assert texts and all(t.strip() for t in texts) and 0 < counts[0] <= 64
    ChatModel("smollm2", cache_dir=str(tmp_path / "cache"))         # reloads, no second conversion
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp


def test_shared_turns_are_computed_once_and_give_the_same_answers(tiny_chat_model, monkeypatch):
    model = ChatModel(str(tiny_chat_model))
    convs = [c for c, _ in training_conversations(8, seed=4)][::2]      # modify prompts: one shared head
    assert model._cache_kwarg in model.prompt_ids(convs)
    mixed = [c for c, _ in training_conversations(2, seed=4)]            # modify and reverse heads differ
    assert model._cache_kwarg not in model.prompt_ids(mixed)
    cached = model.chat(convs, max_new_tokens=40)

    def plain(conversations):
        tok = model.tokenizer
        texts = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
        return dict(tok(texts, return_tensors="pt", padding=True, add_special_tokens=False))

    monkeypatch.setattr(model, "prompt_ids", plain)
    assert model.chat(convs, max_new_tokens=40) == cached
