"""The MTST text generator: its model and export, jobs/train_generator.py on Ray Train
(caption then modification, resume), and the synth job's `mtst` backend."""
from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from cir.config import load_config
from cir.models.config import GeneratorConfig
from cir.outputs import read_table
from cir.train.generator_config import GeneratorTrainConfig

REPO = Path(__file__).resolve().parents[1]
SMALL_LM = {"lm_hidden": 64, "lm_layers": 2, "lm_heads": 2, "vocab_size": 400}


def generator_config(tmp_path, bench: Path, **overrides) -> GeneratorTrainConfig:
    pairs = [("model", {"vision": "cir-shapes", **SMALL_LM}),
             ("run", {"name": "gen", "storage": str(tmp_path / "runs"), "num_workers": 2, "report_every": 5,
                      "checkpoint_every": 10, "eval_every": 0}),
             ("stages", [{"name": "caption", "task": "caption",
                          "data": {"corpus": "shapes", "shapes": {"n_images": 200, "seed": 1}},
                          "optim": {"lr": 1e-3, "warmup_steps": 2, "epochs": 1, "micro_batch_size": 16}},
                         {"name": "modification", "task": "modification",
                          "data": {"benchmark_dir": str(bench), "limit": 160},
                          "optim": {"lr": 1e-3, "warmup_steps": 2, "epochs": 1, "micro_batch_size": 16}}])]
    pairs += [(k.replace("__", "."), v) for k, v in overrides.items()]
    cfg = load_config(GeneratorTrainConfig, None, pairs)
    cfg.validate()
    return cfg


@pytest.fixture(scope="module")
def generator_run(ray_session, small_benchmark, tmp_path_factory):
    from cir.train.generator_loop import run_generator_training

    tmp = tmp_path_factory.mktemp("generator")
    cfg = generator_config(tmp, small_benchmark)
    return run_generator_training(cfg), cfg


def test_export_round_trips_without_pickle(generator_run, small_benchmark, monkeypatch):
    import pickle

    from cir.benchmarks import load_benchmark
    from cir.models.generator import load_generator

    export, _ = generator_run
    monkeypatch.setattr(pickle, "load", lambda *a, **k: pytest.fail("pickle.load called"))
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: pytest.fail("pickle.loads called"))
    g = load_generator(export)
    bench = load_benchmark("shapes", "val", small_benchmark)
    ids = bench.gallery_ids[:4]
    pixels = g.pixels([bench.image_bytes(i) for i in ids])
    texts = g.generate("modification", [pixels, pixels.flip(0)], max_new_tokens=12)
    assert len(texts) == 4 and all(isinstance(t, str) for t in texts)
    again = load_generator(export).generate("modification", [pixels, pixels.flip(0)], max_new_tokens=12)
    assert texts == again  # greedy and reloaded bit for bit


def test_stages_chain_and_resume(generator_run, tmp_path):
    from cir.train.generator_loop import run_generator_training

    export, cfg = generator_run
    run_dir = Path(cfg.run.storage) / cfg.run.name
    for stage in ("caption", "modification"):
        assert (run_dir / stage / "export" / "model.safetensors").is_file()
        assert (run_dir / stage / "curve.png").is_file()
        history = (run_dir / stage / "history.json").read_text()
        assert '"loss"' in history
    before = (export / "model.safetensors").read_bytes()
    assert run_generator_training(cfg) == export           # both stages done: nothing reruns
    assert (export / "model.safetensors").read_bytes() == before
    changed = generator_config(Path(cfg.run.storage).parent, Path(cfg.stages[1].data.benchmark_dir),
                               model__bridge="qformer")
    with pytest.raises(ValueError, match="other settings"):
        run_generator_training(changed)


@pytest.mark.parametrize("bridge,features", [("mlp", "final"), ("qformer", "final"), ("mlp", "embed+final")])
def test_bridges_and_the_loss_covers_text_only(bridge, features):
    from cir.models.generator import Generator, train_tokenizer

    tok = train_tokenizer(["make the red circle blue", "a small red circle at the top"] * 20, 300)
    g = Generator(GeneratorConfig(bridge=bridge, n_queries=4, vision_features=features, **SMALL_LM), tokenizer=tok)
    width = g.visual.conv1.out_channels
    assert g.d_image == (2 * width if features == "embed+final" else width)   # patch embedding beside the token
    pixels = torch.rand(3, 3, *g.preprocess_cfg["size"])
    out = g("modification", [pixels, pixels], ["make the red circle blue"] * 3)
    assert out["tokens"] == 3 * (len(tok("make the red circle blue")["input_ids"]) + 1)  # + EOS
    out["loss"].backward()
    assert all(p.grad is None for p in g.visual.parameters())           # the tower is frozen
    assert g.bridge.norm.weight.grad is not None
    with pytest.raises(ValueError, match="takes 2 image"):
        g("modification", [pixels], ["x"] * 3)


def test_bad_configs_are_refused(tmp_path, small_benchmark):
    with pytest.raises(ValueError, match="bridge"):
        GeneratorConfig(bridge="transformer")
    with pytest.raises(ValueError, match="vision_features"):
        GeneratorConfig(vision_features="middle")
    with pytest.raises(ValueError, match="from scratch"):
        GeneratorConfig(lm_trainable="lora")
    with pytest.raises(ValueError, match="corpus is required"):
        generator_config(tmp_path, small_benchmark, stages=[{"name": "c", "task": "caption"}])
    with pytest.raises(ValueError, match="task must be"):
        generator_config(tmp_path, small_benchmark, stages=[{"name": "c", "task": "translate"}])


# ------------------------------------------------------------------- the mtst backend

def synth_config(output, export, **overrides):
    from cir.synth.config import SynthConfig

    pairs = [("output", str(output)), ("corpus.shapes.n_images", 200), ("encode.model", "cir-shapes"),
             ("generate.backend", "mtst"), ("generate.batch_size", 32), ("generate.mtst.model", str(export)),
             ("generate.mtst.max_new_tokens", 24), ("filter.min_words", 1), ("filter.max_words", 60),
             ("filter.max_caption_similarity", 1.0)] + list(overrides.items())
    return load_config(SynthConfig, REPO / "configs" / "local.yaml", [(k.replace("__", "."), v) for k, v in pairs])


def test_mtst_backend_writes_texts_from_images_and_resumes(generator_run, template_synth, tmp_path):
    from cir.generate.mtst import GENERATOR_PREFIX
    from cir.models.generator import load_generator
    from cir.synth.pipeline import SynthRun
    from conftest import copy_mined

    export, _ = generator_run
    out = copy_mined(template_synth, tmp_path / "synth")    # the same corpus and pairs: only mtst runs
    settings = {"generate.max_pairs": 40}   # an untrained generator writes every text to max_new_tokens
    summary = SynthRun(synth_config(out, export, **settings)).run()
    triplets = read_table(out / "triplets").sort_by("triplet_id")
    pairs = read_table(out / "pairs")
    assert triplets.num_rows > 0 and triplets.num_rows == summary.stages["triplets"].extra["filter"]["kept"]
    assert set(triplets.column("source").to_pylist()) == {"mtst"}
    assert all(g.startswith(GENERATOR_PREFIX) for g in triplets.column("generator").to_pylist())
    assert set(triplets.column("ref_id").to_pylist()) <= set(pairs.column("ref_id").to_pylist())
    # The texts are the generator's own greedy answers for the pair's two images.
    corpus = pq.read_table(out / "corpus").to_pylist()
    image = {r["image_id"]: r["image"] for r in corpus}
    g = load_generator(export)
    row = triplets.slice(0, 1).to_pylist()[0]
    a, b = g.pixels([image[row["ref_id"]]]), g.pixels([image[row["tgt_id"]]])
    assert g.generate("modification", [a, b], 24) == [row["text"]]
    if row["reverse_text"] is not None:
        assert g.generate("modification", [b, a], 24) == [row["reverse_text"]]
    # Resume: only the deleted stage runs again, and gives the same rows.
    shutil.rmtree(out / "triplets")
    again = SynthRun(synth_config(out, export, **settings)).run()
    assert [n for n, r in again.stages.items() if not r.skipped] == ["triplets"]
    assert read_table(out / "triplets").sort_by("triplet_id").equals(triplets)


def test_mtst_needs_a_modification_export(generator_run, tmp_path):
    from cir.synth.pipeline import SynthRun

    export, cfg = generator_run
    caption_export = Path(cfg.run.storage) / cfg.run.name / "caption" / "export"
    with pytest.raises(ValueError, match="required"):
        SynthRun(synth_config(tmp_path / "a", ""))
    with pytest.raises(ValueError, match="'caption' task"):
        SynthRun(synth_config(tmp_path / "b", caption_export))
    with pytest.raises(FileNotFoundError, match="not an exported text generator"):
        SynthRun(synth_config(tmp_path / "c", tmp_path))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()



# ------------------------------------------------------- pretraining on synth triplets

@pytest.fixture(scope="module")
def template_synth(shapes_synth):
    """The session's default synth output: caption-based `template` texts over 200 shapes
    images."""
    return shapes_synth[0]


def test_synth_triplets_become_examples_with_their_images(template_synth):
    from cir.train.generator_config import GeneratorDataConfig
    from cir.train.generator_data import modification_texts, synth_examples

    triplets = read_table(template_synth / "triplets")
    image = {r["image_id"]: r["image"] for r in pq.read_table(template_synth / "corpus").to_pylist()}
    data = GeneratorDataConfig(synth_dir=str(template_synth))
    ds, n = synth_examples(data, workers=2)
    rows = ds.take_all()
    with_reverse = sum(t is not None for t in triplets.column("reverse_text").to_pylist())
    assert n == len(rows) == triplets.num_rows + with_reverse
    by_text = {r["text"]: r for r in rows}
    for t in triplets.slice(0, 10).to_pylist():
        forward = by_text[t["text"]]
        assert (forward["a_image"], forward["b_image"]) == (image[t["ref_id"]], image[t["tgt_id"]])
        if t["reverse_text"]:
            back = by_text[t["reverse_text"]]
            assert (back["a_image"], back["b_image"]) == (image[t["tgt_id"]], image[t["ref_id"]])
    assert sorted(modification_texts(data)) == sorted(r["text"] for r in rows)
    ds, n = synth_examples(GeneratorDataConfig(synth_dir=str(template_synth), reverse=False, limit=7), workers=1)
    assert n == ds.count() == 7
    with pytest.raises(FileNotFoundError, match="not a finished synth table"):
        synth_examples(GeneratorDataConfig(synth_dir=str(template_synth.parent)), workers=1)


def test_a_run_on_a_bucket_captions_its_corpus_there_and_pretrains_on_synth_triplets_there(
        template_synth, small_benchmark, s3_uri, tmp_path):
    """`run.storage` and the synth output at S3 URIs (the session's moto server): the
    shapes corpus of the caption stage is written there, the pairs stage reads the synth
    triplets and images from there, and the export loads back from the URI."""
    import json

    from cir.models.generator import load_generator
    from cir.outputs import copy_output
    from cir.storage import resolve
    from cir.train.generator_loop import run_generator_training
    from conftest import uri_child

    synth = uri_child(s3_uri, "synth")
    copy_output(template_synth, synth, ["corpus", "embeddings", "pairs", "triplets"])
    optim = {"lr": 1e-3, "warmup_steps": 2, "epochs": 1, "micro_batch_size": 16}
    cfg = generator_config(tmp_path, small_benchmark, run__storage=uri_child(s3_uri, "runs"), stages=[
        {"name": "caption", "task": "caption", "data": {"corpus": "shapes", "shapes": {"n_images": 64, "seed": 1}},
         "optim": optim},
        {"name": "pairs", "task": "modification", "data": {"synth_dir": synth, "limit": 48}, "optim": optim}])
    export = run_generator_training(cfg)
    runs = resolve(cfg.run.storage)
    assert export == runs / "gen" / "pairs" / "export"
    assert (runs / "corpora" / "shapes-64-seed1-64px-f8" / "_SUCCESS.json").is_file()
    assert not (tmp_path / "runs").exists()
    assert json.loads((export / "config.json").read_text())["extra"]["task"] == "modification"
    assert load_generator(str(export)).cfg.lm_layers == SMALL_LM["lm_layers"]
    assert run_generator_training(cfg) == export


def test_a_stage_rehearses_synth_pairs_under_their_own_prompt(template_synth, small_benchmark, tmp_path):
    """A modification stage on annotated triplets with `rehearse`: its examples carry its
    prompt, the rehearsed synth pairs theirs (null: the model's), shuffled together."""
    from cir.train.generator_loop import stage_examples

    cfg = generator_config(tmp_path, small_benchmark, stages=[
        {"name": "modification", "task": "modification",
         "data": {"benchmark_dir": str(small_benchmark), "limit": 40, "prompt": "Say it your way:",
                  "rehearse": {"synth_dir": str(template_synth), "triplets": 20}}}])
    dataset, n = stage_examples(cfg.stages[0], workers=2, storage=cfg.run.storage)
    rows = dataset.take_all()
    prompts = [r["prompt"] for r in rows]
    assert n == len(rows) == 80 + 40                  # forward and reverse of each
    assert prompts.count("Say it your way:") == 80 and prompts.count(None) == 40
    assert None in prompts[:60] and "Say it your way:" in prompts[60:]   # mixed, not one after the other
    with pytest.raises(ValueError, match="rehearse needs a synth_dir"):
        generator_config(tmp_path, small_benchmark, stages=[
            {"name": "m", "task": "modification", "data": {"rehearse": {"triplets": 5}}}])
    with pytest.raises(ValueError, match="data.prompt applies to modification stages"):
        generator_config(tmp_path, small_benchmark, stages=[
            {"name": "c", "task": "caption", "data": {"corpus": "x.parquet", "prompt": "Say:"}}])
    with pytest.raises(ValueError, match="not a 'caption' one"):
        generator_config(tmp_path, small_benchmark, stages=[
            {"name": "c", "task": "caption", "data": {"corpus": "x.parquet",
                                                      "rehearse": {"synth_dir": str(template_synth)}}}])


def test_a_batch_of_two_prompts_is_each_prompt_weighted_by_its_tokens():
    from cir.models.generator import Generator, train_tokenizer

    torch.manual_seed(0)
    texts = ["make the red circle blue", "remove the small green star at the top", "add a star"]
    tok = train_tokenizer(texts * 10 + ["Say it your way:"], 300)
    g = Generator(GeneratorConfig(**SMALL_LM), tokenizer=tok).eval()
    pixels = [torch.rand(3, 3, *g.preprocess_cfg["size"]) for _ in range(2)]
    mixed = g("modification", pixels, texts, [None, "Say it your way:", None])
    own = g("modification", [p[[0, 2]] for p in pixels], [texts[0], texts[2]])
    other = g("modification", [p[[1]] for p in pixels], [texts[1]], ["Say it your way:"])
    assert mixed["tokens"] == own["tokens"] + other["tokens"]
    expected = (own["loss"] * own["tokens"] + other["loss"] * other["tokens"]) / mixed["tokens"]
    assert torch.allclose(mixed["loss"], expected, atol=1e-6)
    assert not torch.allclose(g("modification", pixels, texts)["loss"], mixed["loss"])   # the prompt is read
    assert len(g.generate("modification", pixels, max_new_tokens=4, prompt="Say it your way:")) == 3


# ----------------------------------------------------------------- the captions step

@pytest.fixture(scope="module")
def half_captioned_corpus(tmp_path_factory):
    """A shapes corpus (Parquet) whose odd rows have lost their captions."""
    import pyarrow as pa

    from cir.data.shapes_corpus import write_corpus

    folder = write_corpus(tmp_path_factory.mktemp("corpus") / "shapes", 80, seed=5)
    table = pq.read_table(folder)
    caps = [c if i % 2 == 0 else None for i, c in enumerate(table.column("caption").to_pylist())]
    table = table.set_column(table.column_names.index("caption"), "caption", pa.array(caps, pa.string()))
    out = folder.parent / "half.parquet"
    pq.write_table(table, out)
    return out, table


def test_captions_step_fills_missing_captions_and_resumes(generator_run, half_captioned_corpus, tmp_path):
    from cir.generate.quality import KEPT, FilterConfig, text_reason
    from cir.models.generator import load_generator
    from cir.synth.pipeline import SynthRun

    _, cfg = generator_run
    captioner = Path(cfg.run.storage) / cfg.run.name / "caption" / "export"
    corpus, source = half_captioned_corpus
    out = tmp_path / "synth"
    settings = {"corpus.source": str(corpus), "generate.backend": "template", "captions.captioner": "generator",
                "captions.model": str(captioner), "captions.max_new_tokens": 40}
    summary = SynthRun(synth_config(out, "", **settings)).run()
    assert summary.stages["captions"].extra["missing_before"] == 40
    written = {r["image_id"]: r for r in pq.read_table(out / "captions").to_pylist()}
    g = load_generator(captioner)
    for row in source.to_pylist():
        if row["caption"] is not None:
            assert written[row["image_id"]]["caption"] == row["caption"]     # kept as it was
    missing = [r for r in source.to_pylist() if r["caption"] is None][:6]
    expected = g.generate("caption", [g.pixels([r["image"] for r in missing])], 40)
    kept = [t if text_reason(t, "", "", FilterConfig(min_words=1, max_words=60)) == KEPT else None for t in expected]
    assert [written[r["image_id"]]["caption"] for r in missing] == kept  # the captioner's, through the filter
    assert summary.stages["captions"].extra["missing_after"] < 40
    # Resume: a finished captions stage is reused.
    shutil.rmtree(out / "triplets")
    again = SynthRun(synth_config(out, "", **settings)).run()
    assert [n for n, r in again.stages.items() if not r.skipped] == ["triplets"]


def test_captioner_checks(generator_run, half_captioned_corpus, ray_session, tmp_path):
    from cir.synth.pipeline import SynthRun

    export, _ = generator_run
    corpus, _ = half_captioned_corpus
    with pytest.raises(ValueError, match="'modification' task, not 'caption'"):
        SynthRun(synth_config(tmp_path / "a", "", **{"generate.backend": "template", "captions.captioner": "generator",
                                                     "captions.model": str(export)}))
    with pytest.raises(ValueError, match="captions.model is required"):
        SynthRun(synth_config(tmp_path / "b", "", **{"generate.backend": "template", "captions.captioner": "hf"}))
    run = SynthRun(synth_config(tmp_path / "c", "", **{
        "corpus.source": str(corpus), "generate.backend": "template", "captions.captioner": "vllm",
        "captions.vllm.model_source": "Qwen/Qwen2.5-VL-3B-Instruct"}))
    with pytest.raises(ValueError, match="GPUs"):
        run.run()                                   # refused before anything is written
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").iterdir())


# ------------------------------------------------------------------------- scoring

def test_score_job_scores_generator_template_and_trivial(generator_run, template_synth, small_benchmark, tmp_path):
    import json

    from jobs.score_generator import main

    export, cfg = generator_run
    captioner = Path(cfg.run.storage) / cfg.run.name / "caption" / "export"
    out = tmp_path / "scores.json"
    assert main(["--pairs", str(template_synth), "--n", "24", "--generator", str(export), "--captioner",
                 str(captioner), "--benchmark-dir", str(small_benchmark), "--output", str(out)]) == 0
    scores = json.loads(out.read_text())
    mod = scores["modification"]
    assert scores["n_pairs"] == 24
    assert set(mod) == {"generator (gen/modification)", "template backend", "most common train text"}
    # Caption-based template texts are exact by construction: the checker's upper bound.
    assert mod["template backend"]["forward"]["all"] == mod["template backend"]["reverse"]["all"] == 100.0
    assert sum(mod["template backend"]["forward"]["n"].values()) == 24
    assert mod["most common train text"]["forward"]["all"] < 50.0
    assert 0.0 <= mod["generator (gen/modification)"]["forward"]["all"] <= 100.0
    assert scores["caption"]["n"] == 24 and 0.0 <= scores["caption"]["captioner"] <= 100.0
    assert main(["--pairs", str(template_synth)]) == 2                  # nothing to score
    assert main(["--pairs", str(tmp_path), "--generator", str(export)]) == 2   # not a synth output


def test_exact_shares_by_edit_count():
    from cir.generate.score import exact_share, most_common

    s = exact_share([True, False, True, True], ["1", "1", "2", "4+"])
    assert (s["all"], s["1"], s["2"], s["3"], s["4+"]) == (75.0, 50.0, 100.0, None, 100.0)
    assert s["n"] == {"1": 2, "2": 1, "3": 0, "4+": 1}
    assert most_common(["a", None, "b", "b"]) == "b"
    with pytest.raises(ValueError):
        most_common([None])
