"""The `vllm` backend on a CPU machine without vLLM: its processor builds, its options
are checked, the row plumbing around the engine works (the engine stage faked), and a
GPU-less cluster is refused within seconds, before the synth job writes anything."""
from __future__ import annotations

import json
import time

import numpy as np
import pyarrow as pa
import pytest

from cir.generate import build_backend
from cir.generate.llm import ChatTask, TextTaskOptions
from cir.generate.prompting import load_prompt
from cir.generate.vllm import ChatAnswer, ChatRequest, VLLMBackend, VLLMOptions
from cir.outputs import read_table
from cir.schemas import embedding_array, embedding_matrix
from cir.synth.config import GenerateConfig
from cir.synth.pipeline import STAGES, SynthRun

from test_synth import make_config

QWEN = "Qwen/Qwen2.5-7B-Instruct"
ENGINE = {"max_model_len": 4096, "gpu_memory_utilization": 0.9, "enable_prefix_caching": True}


def backend(**options) -> VLLMBackend:
    g = GenerateConfig(backend="vllm", batch_size=64, num_actors=2,
                       options=TextTaskOptions(temperature=0.7, top_p=0.9, seed=5))
    g.vllm = VLLMOptions(**{"model_source": QWEN, "engine_kwargs": dict(ENGINE), **options})
    return build_backend(g)


@pytest.fixture
def model_folder(tmp_path):
    # A model folder as on shared storage (its config only): building a processor reads
    # the model's config for Ray's telemetry, and a hub id would retry the hub for ~25 s here.
    folder = tmp_path / "Qwen2.5-7B-Instruct"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}))
    return folder


def pairs(n: int, dim: int = 0) -> pa.Table:
    table = pa.table({
        "pair_id": [f"p{i}" for i in range(n)], "ref_id": [f"a{i}" for i in range(n)],
        "tgt_id": [f"b{i}" for i in range(n)], "similarity": pa.array([0.8] * n, pa.float32()),
        "ref_caption": [f"a red circle number {i}" for i in range(n)],
        "tgt_caption": [f"a blue circle number {i}" for i in range(n)],
    })
    if dim:      # the image direction the synth job adds for the quality filter
        table = table.append_column("direction", embedding_array(direction_vectors(n, dim)))
    return table


def direction_vectors(n: int, dim: int) -> np.ndarray:
    return np.random.default_rng(0).normal(size=(n, dim)).astype(np.float32)


def test_processor_config_carries_the_options():
    b = backend(accelerator_type="H100", max_concurrent_batches=4, runtime_env={"env_vars": {"A": "1"}})
    b.validate()
    c = b.processor_config()
    assert (c.model_source, c.batch_size, c.concurrency, c.accelerator_type) == (QWEN, 64, 2, "H100")
    assert c.chat_template_stage is True and c.tokenize_stage is True and c.detokenize_stage is True
    assert c.max_concurrent_batches == 4 and c.runtime_env == {"env_vars": {"A": "1"}}
    assert {k: c.engine_kwargs[k] for k in ENGINE} == ENGINE and c.engine_kwargs["task_type"] == "generate"
    assert b.options.engine_kwargs == ENGINE            # Ray's additions stay out of the options
    assert b.model_id == QWEN and b.generator_id() == f"vllm:{QWEN}@modify.v1+reverse.v1"
    assert backend(model_source="s3://bucket/models/Llama-3.1-8B-Instruct/").model_id == "Llama-3.1-8B-Instruct"


def test_fingerprint_follows_the_texts_not_the_waiting():
    fp = backend().fingerprint()
    assert fp["options"] == {"model_source": QWEN, "engine_kwargs": ENGINE} and fp["task"]["seed"] == 5
    assert backend(gpu_wait_s=600, accelerator_type="A100").fingerprint() == fp
    assert backend(model_source="meta-llama/Llama-3.1-8B-Instruct").fingerprint() != fp
    assert backend(engine_kwargs={"max_model_len": 2048}).fingerprint() != fp


def test_request_and_answer_rows():
    task = ChatTask(load_prompt("modify.v1"), 3, 48, "answer")
    row = {"pair_id": "p0", "ref_caption": "a red circle.", "tgt_caption": "a blue circle", "similarity": 0.8}
    request = ChatRequest(task, backend().sampling(task))(row)
    assert request["sampling_params"] == {"max_tokens": 48, "temperature": 0.7, "top_p": 0.9, "seed": 5}
    assert request["messages"][-1]["role"] == "user"
    assert "a red circle." in request["messages"][-1]["content"] and "Write 3" in request["messages"][-1]["content"]
    out = ChatAnswer("answer", ["pair_id", "similarity"])(
        {**row, **request, "generated_text": " 1. make it blue\n", "num_generated_tokens": 6})
    assert out == {"pair_id": "p0", "similarity": 0.8, "answer": "1. make it blue", "answer_tokens": 6}


@pytest.mark.parametrize("key, value, match", [
    ("model_source", "", "model_source is empty"),
    ("model_source", "  ", "model_source is empty"),
    ("gpu_wait_s", -1.0, "gpu_wait_s must be >= 0"),
    ("engine_kwargs", ["max_model_len", 4096], "engine_kwargs must be a mapping"),
    ("max_concurrent_batches", 0, "max_concurrent_batches"),
    ("accelerator_type", "", "accelerator_type is empty"),
])
def test_bad_options_are_named(key, value, match):
    with pytest.raises(ValueError, match=match):
        backend(**{key: value}).validate()


def test_synth_config_refuses_a_vllm_backend_without_a_model(tmp_path):
    cfg = make_config(tmp_path / "out", generate__backend="vllm")
    with pytest.raises(ValueError, match="generate.vllm.model_source"):
        cfg.validate()


def test_build_processor_without_vllm(ray_session, model_folder):
    import importlib.util

    from ray.data.llm import Processor, build_processor

    assert importlib.util.find_spec("vllm") is None     # this machine never has it
    b = backend(model_source=str(model_folder))
    task = b.tasks()[0]
    processor = build_processor(b.processor_config(), preprocess=ChatRequest(task, b.sampling(task)),
                                postprocess=ChatAnswer(task.output, ["pair_id"]))
    assert isinstance(processor, Processor)
    assert processor.list_stage_names() == ["ChatTemplateStage", "TokenizeStage", "vLLMEngineStage",
                                            "DetokenizeStage"]
    assert b.model_id == "Qwen2.5-7B-Instruct"


def fake_build_processor(config, preprocess, postprocess):
    """A processor whose only stage answers like the engine would (no model, no GPU)."""
    import ray
    from ray.llm._internal.batch.processor.base import Processor
    from ray.llm._internal.batch.stages.base import StatefulStage, StatefulStageUDF

    class FakeEngine(StatefulStageUDF):
        async def udf(self, rows):
            for row in rows:
                few = row["sampling_params"]["max_tokens"] < 32      # the reverse prompt's budget
                text = "make it blue" if few else f"1. turn {row['ref_caption']} blue\n2. make it blue"
                yield {self.IDX_IN_BATCH_COLUMN: row[self.IDX_IN_BATCH_COLUMN], "generated_text": text,
                       "num_generated_tokens": row["sampling_params"]["max_tokens"] - 1}

    stage = StatefulStage(fn=FakeEngine, map_batches_kwargs={"compute": ray.data.ActorPoolStrategy(size=1)})
    return Processor(config, [stage], preprocess=preprocess, postprocess=postprocess)


def test_generate_and_apply_through_a_faked_engine(ray_session, monkeypatch):
    import ray
    import ray.data.llm

    monkeypatch.setattr(ray.data.llm, "build_processor", fake_build_processor)
    b = backend(engine_kwargs={"max_model_len": 2048})
    b.task.texts_per_pair = 2
    carry = pairs(4).column_names
    rows = b.generate(ray.data.from_arrow(pairs(4)), b.tasks()[0], carry).take_all()
    assert sorted(r["pair_id"] for r in rows) == ["p0", "p1", "p2", "p3"]
    assert {r["answer_tokens"] for r in rows} == {b.task.max_new_tokens - 1}
    assert all(set(r) == set(carry) | {"answer", "answer_tokens"} for r in rows)

    # Rows cross the processor as dicts: the pairs' Arrow types must come back (the
    # quality filter reads `direction` as a fixed_size_list<float32>).
    candidates = pa.concat_tables(b.apply(ray.data.from_arrow(pairs(4, dim=8))).iter_batches(
        batch_format="pyarrow", batch_size=None)).sort_by([("ref_id", "ascending"), ("text", "ascending")])
    assert candidates.num_rows == 4 * 2
    assert candidates.schema.field("direction").type == pa.list_(pa.float32(), 8)
    assert candidates.schema.field("similarity").type == pa.float32()
    np.testing.assert_array_equal(embedding_matrix(candidates.column("direction")),
                                  np.repeat(direction_vectors(4, 8), 2, axis=0))
    triplets = candidates.to_pylist()
    assert {t["text"] for t in triplets if t["ref_id"] == "a1"} == {"turn a red circle number 1 blue", "make it blue"}
    assert {t["reverse_text"] for t in triplets} == {"make it blue"}
    assert {t["generator"] for t in triplets} == {f"vllm:{QWEN}@modify.v1+reverse.v1"}


@pytest.mark.parametrize("wait", [0.0, 1.0])
def test_a_cluster_without_gpus_is_refused_within_seconds(ray_session, wait):
    t0 = time.monotonic()
    with pytest.raises(ValueError, match="no GPUs") as e:
        backend(gpu_wait_s=wait).check_cluster()
    assert time.monotonic() - t0 < wait + 5
    assert "generate.backend: hf" in str(e.value) and "generate.backend: http" in str(e.value)
    assert ("gpu_wait_s" in str(e.value)) == (wait == 0)       # the hint for autoscaling clusters


def test_gpu_nodes_without_vllm_are_refused(ray_session, monkeypatch):
    # This node, passed off as a GPU node: the probe runs there and finds no vLLM.
    import ray

    node = next(n for n in ray.nodes() if n["Alive"])
    fake = {**node, "Resources": {**node["Resources"], "GPU": 1.0}}
    monkeypatch.setattr(VLLMBackend, "gpu_nodes", lambda self: [fake])
    t0 = time.monotonic()
    with pytest.raises(ValueError, match="vLLM is not installed on GPU node") as e:
        backend().check_cluster()
    assert time.monotonic() - t0 < 30
    assert node["NodeManagerAddress"] in str(e.value) and "cir[gpu]" in str(e.value)
    assert "generate.backend: hf" in str(e.value)


def test_waiting_ends_when_gpus_appear(ray_session, monkeypatch):
    import cir.generate.vllm as vllm

    node = next(n for n in ray_session.nodes() if n["Alive"])
    seen = iter([[], [], [{**node, "Resources": {"GPU": 2.0}}]])
    monkeypatch.setattr(vllm, "POLL_S", 0.05)
    monkeypatch.setattr(VLLMBackend, "gpu_nodes", lambda self: next(seen))
    monkeypatch.setattr(VLLMBackend, "_check_vllm_installed", lambda self, nodes: None)
    t0 = time.monotonic()
    backend(gpu_wait_s=60, engine_kwargs={"tensor_parallel_size": 2}).check_cluster()
    assert time.monotonic() - t0 < 5


def test_synth_refuses_vllm_on_a_cpu_cluster_before_writing(ray_session, tmp_path):
    out = tmp_path / "out"
    cfg = make_config(out, generate__backend="vllm", generate__vllm__model_source=QWEN,
                      generate__vllm__engine_kwargs={"max_model_len": 4096})
    t0 = time.monotonic()
    with pytest.raises(ValueError, match="cluster has no GPUs"):
        SynthRun(cfg).run()
    assert time.monotonic() - t0 < 10
    assert not out.exists() or not [p.name for p in out.iterdir() if any(s in p.name for s in STAGES)]


def test_synth_with_a_faked_engine_filters_and_writes_triplets(shapes_synth, monkeypatch, tmp_path):
    # The job's triplets stage past the cluster check, over the session's corpus and pairs,
    # with the direction check on (the shipped cir-shapes encoder has a trained text
    # tower): the pipeline's columns survive vLLM's.
    import ray.data.llm

    from conftest import copy_mined

    monkeypatch.setattr(ray.data.llm, "build_processor", fake_build_processor)
    monkeypatch.setattr(VLLMBackend, "check_cluster", lambda self: None)
    out = copy_mined(shapes_synth[0], tmp_path / "out")
    cfg = make_config(out, generate__backend="vllm", generate__vllm__model_source=QWEN, generate__batch_size=64,
                      generate__options__texts_per_pair=2, filter__min_direction_score=-1.0)
    summary = SynthRun(cfg).run()
    assert [name for name, r in summary.stages.items() if not r.skipped] == ["triplets"]
    counts = summary.stages["triplets"].extra["filter"]
    pairs_n = summary.stages["pairs"].rows
    assert counts["candidates"] == 2 * pairs_n and counts["kept"] > 0
    triplets = read_table(out / "triplets")
    assert triplets.num_rows == counts["kept"] and set(triplets.column("source").to_pylist()) == {"llm"}
    assert set(triplets.column("reverse_text").to_pylist()) == {"make it blue"}
