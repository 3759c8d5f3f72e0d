"""The composer on tiny models: query kinds, prompts and padding, what trains, the
training objectives around it, export/reload, learning."""
from __future__ import annotations

import json
import os
import pickle
import re

import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from cir.losses import LossConfig  # noqa: E402
from cir.models import ComposerConfig, build_composer, export_composer, load_composer  # noqa: E402
from cir.train.objectives import build_objective  # noqa: E402

TEXTS = ["make it red", "add a large blue square at the top left and remove the circle", ""]
TRAINABLE_GROUPS = ("adapter.", "prototype_adapter.", "proj.", "target_proj.", "logit_scale")


def _build(seed=0, **kw):
    torch.manual_seed(seed)
    return build_composer(ComposerConfig(**kw))


def _feats(n, d, seed=1):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g), dim=-1)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # On a shared 2-core machine two torch threads spin-wait on each other whenever the
    # other core is busy: tiny-model steps then take ~1 s instead of ~10 ms.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny():
    return _build().eval()


@pytest.fixture(scope="module")
def tiny_llama():
    return _build(llm="builtin:tiny-llama").eval()


def _all_kinds(m, f, texts):
    with torch.no_grad():
        comp = m.encode_composed(f, texts)
        return {"composed": comp, "image": m.encode_image_query(f), "text": m.encode_text_query(texts),
                "target": m.encode_target(f), "prototype": m.encode_prototype_composed(comp, texts)}


@pytest.mark.parametrize("which", ["tiny", "tiny_llama"])
def test_query_kinds_have_shape_and_unit_norm(which, request):
    m = request.getfixturevalue(which)
    f = _feats(3, m.d_clip)
    for kind, e in _all_kinds(m, f, TEXTS).items():
        assert e.shape == (3, m.embed_dim), kind
        assert torch.allclose(e.norm(dim=-1), torch.ones(3), atol=1e-5), kind
    assert m.embed_dim == m.d_clip == 128  # embed_dim defaults to the CLIP dim
    assert m.pooling == ("last" if which == "tiny_llama" else "mean")


def test_composer_target_path_and_own_embed_dim():
    m = _build(target_path="composer", embed_dim=32, prototype_adapter=False).eval()
    assert m.target_proj is None and m.prototype_adapter is None
    f = _feats(2, m.d_clip)
    with torch.no_grad():
        tgt, img = m.encode_target(f), m.encode_image_query(f)
        assert m.encode_composed(f, ["a", "b"]).shape == tgt.shape == (2, 32)
    assert torch.equal(tgt, img)


def test_vision_tower_is_the_one_that_cached_the_training_features():
    # cir-tiny has no weights: both sides must build it from the same seed
    from PIL import Image

    import pyarrow as pa

    from cir.embed import Embedder

    torch.manual_seed(123)  # whatever the caller's RNG state
    m = _build(seed=7)
    image = Image.new("RGB", (64, 64), "red")
    buf = __import__("io").BytesIO()
    image.save(buf, format="PNG")
    row = Embedder("cir-tiny", threads=1)(pa.table({"image_id": ["red"], "image": [buf.getvalue()]}))
    cached = row.column("embedding").to_pylist()[0]
    with torch.no_grad():
        own = m.image_features(m.preprocess(image)[None])
    assert abs(own.numpy() - cached).max() < 1e-5


def test_residual_query_is_the_reference_in_target_space_plus_the_llm_output():
    m = _build(seed=5, residual=True).eval()
    f = _feats(3, m.d_clip)
    with torch.no_grad():
        m.proj.weight.zero_()
        m.proj.bias.zero_()
        # with the LLM's contribution zeroed, hop 1 is the reference's target embedding
        # and hop 2 is the prototype itself
        comp = m.encode_composed(f, TEXTS)
        assert torch.allclose(comp, m.encode_target(f), atol=1e-6)
        assert torch.allclose(m.encode_prototype_composed(comp, TEXTS), comp, atol=1e-6)
        m.proj.bias.fill_(0.1)
        moved = m.encode_composed(f, TEXTS)
    assert torch.allclose(moved, F.normalize(m.encode_target(f) + 0.1, dim=-1), atol=1e-6)


def test_the_retrieval_query_is_the_one_the_objective_trained_and_the_export_keeps_it(tmp_path):
    m = _build(seed=6).eval()
    f = _feats(3, m.d_clip)
    with torch.no_grad():
        hop1 = m.encode_composed(f, TEXTS)
        hop2 = m.encode_prototype_composed(hop1, TEXTS)
        assert torch.equal(m.encode_query(f, TEXTS), hop1)  # a new composer: the composed query
        for objective, want in (("ptha", hop2), ("infonce", hop1), ("collm3", hop1)):
            build_objective(m, LossConfig(objective=objective))
            assert torch.equal(m.encode_query(f, TEXTS), want), objective
        build_objective(m, LossConfig(objective="ptha"))
        assert load_composer(export_composer(m, out_dir=tmp_path / "ptha")).cfg.query_hops == 2
        meta = json.loads((tmp_path / "ptha" / "config.json").read_text())
        assert meta["format_version"] == 2 and "loss" not in meta
    with pytest.raises(ValueError, match="prototype_adapter"):
        build_objective(_build(prototype_adapter=False), LossConfig(objective="ptha"))
    with pytest.raises(ValueError, match="query_hops=2 .* needs prototype_adapter"):
        ComposerConfig(query_hops=2, prototype_adapter=False)


def test_a_version_1_export_retrieves_with_the_query_its_loss_trained(tmp_path):
    """Version 1 exports named the training loss, not the query: PTHA there means hop 2."""
    for objective, hops in (("ptha", 2), ("infonce", 1)):
        out = export_composer(_build(seed=8), out_dir=tmp_path / objective)
        meta = json.loads((out / "config.json").read_text())
        meta["format_version"] = 1
        meta["loss"] = {"objective": objective}
        del meta["composer"]["query_hops"]
        (out / "config.json").write_text(json.dumps(meta))
        assert load_composer(out).cfg.query_hops == hops


def test_residual_needs_the_vision_target_path():
    with pytest.raises(ValueError, match="residual=True needs target_path='vision'"):
        ComposerConfig(residual=True, target_path="composer")


def test_runs_when_deepspeed_casts_everything_to_bf16():
    m = _build(seed=2).to(torch.bfloat16)
    out = build_objective(m, LossConfig(objective="collm3"))(
        {"ref_feats": _feats(3, m.d_clip), "tgt_feats": _feats(3, m.d_clip, 2), "texts": TEXTS})
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and m.adapter.mlp[0].weight.grad is not None


def test_visual_tokens_and_text_change_the_query(tiny):
    f = _feats(2, tiny.d_clip)
    with torch.no_grad():
        a = tiny.encode_composed(f, ["make it red"] * 2)
        b = tiny.encode_composed(f[[1, 0]], ["make it red"] * 2)
        c = tiny.encode_composed(f, ["make it blue", "make it red"])
    assert (a[0] - a[1]).abs().max() > 1e-4  # different images, same text
    assert torch.allclose(a, b[[1, 0]], atol=1e-6)  # rows are independent
    assert (a[0] - c[0]).abs().max() > 1e-4  # same image, different text
    assert torch.allclose(a[1], c[1], atol=1e-6)


@pytest.mark.parametrize("which", ["tiny", "tiny_llama"])
def test_padding_does_not_change_a_query(which, request):
    m = request.getfixturevalue(which)
    f = _feats(3, m.d_clip)
    with torch.no_grad():
        batched = m.encode_composed(f, TEXTS)
        alone = torch.cat([m.encode_composed(f[i:i + 1], TEXTS[i:i + 1]) for i in range(3)])
    assert torch.allclose(batched, alone, atol=1e-5)
    if m.decoder_only:  # left padding (as decoder LLEMs ship) gives the same embeddings
        side = m.tokenizer.padding_side
        m.tokenizer.padding_side = "left"
        try:
            with torch.no_grad():
                left = m.encode_composed(f, TEXTS)
            ids, mask = m.prompts(m.cfg.composed_template, TEXTS, 3)
            assert mask[:, -1].all() and not mask[:, 0].all()
        finally:
            m.tokenizer.padding_side = side
        assert torch.allclose(batched, left, atol=1e-5)


def test_prompt_puts_visual_tokens_at_img_and_truncates_text(tiny):
    ids, mask = tiny.prompts(tiny.cfg.composed_template, ["word " * 500], 1)
    row = ids[0][mask[0].bool()].tolist()
    assert row[0] == tiny.tokenizer.cls_token_id and row[-1] == tiny.tokenizer.sep_token_id
    vis = [i for i, t in enumerate(row) if t == -1]
    assert len(vis) == tiny.cfg.n_visual_tokens and vis == list(range(vis[0], vis[0] + len(vis)))
    before = tiny.tokenizer.decode(row[1:vis[0]])
    assert before == "retrieve an image that matches the reference image"
    after = tiny.tokenizer.decode(row[vis[-1] + 1:-1]).split()
    assert after[:3] == ["modified", "as", "follows"]
    assert after.count("word") == tiny.cfg.max_text_tokens  # the text alone is truncated


def _trainable(m):
    return [n for n, p in m.named_parameters() if p.requires_grad]


def test_lora_trains_only_lora_adapters_and_projections(tiny):
    names = _trainable(tiny)
    assert names and all("lora_" in n or n.startswith(TRAINABLE_GROUPS) for n in names), names
    assert any("lora_" in n for n in names)
    assert not any(n.startswith("visual.") for n in names)
    assert all(p.dim() > 0 for p in tiny.parameters())  # DeepSpeed breaks on 0-dim parameters
    assert tiny.logit_scale.shape == (1,)
    assert tiny.logit_scale.item() == pytest.approx(-torch.log(torch.tensor(0.07)).item())
    summary = tiny.trainable_parameters_summary().splitlines()
    trainable, total = (int(x.replace(",", "")) for x in
                        re.search(r": ([\d,]+) of ([\d,]+) parameters trainable", summary[0]).groups())
    assert trainable == sum(p.numel() for p in tiny.parameters() if p.requires_grad)
    assert total == sum(p.numel() for p in tiny.parameters())
    rows = {line.split()[0]: [int(x.replace(",", "")) for x in line.split()[1:4:2]] for line in summary[1:]}
    lora = sum(p.numel() for n, p in tiny.llm.named_parameters() if "lora_" in n)
    assert rows["llm"] == [lora, sum(p.numel() for p in tiny.llm.parameters())] and 0 < lora
    assert rows["visual"][0] == 0 and rows["adapter"][0] == rows["adapter"][1] > 0


def test_llm_trainable_modes():
    full = _build(lora=False, llm_trainable="full")
    assert any(n.startswith("llm.") for n in _trainable(full))
    frozen = _build(lora=False, vision_trainable=True)
    names = _trainable(frozen)
    assert not any(n.startswith("llm.") for n in names) and any(n.startswith("visual.") for n in names)
    with pytest.raises(ValueError):
        ComposerConfig(lora=False, llm_trainable="lora")
    with pytest.raises(ValueError):
        ComposerConfig(composed_template="no placeholder here")


def _no_pickle(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("unpickling during load")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)


def test_export_reload_gives_identical_embeddings_without_pickle(tiny, tmp_path, monkeypatch):
    # give the LoRA weights non-zero values (B starts at zero) so they matter
    with torch.no_grad():
        for n, p in tiny.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    out = tmp_path / "export"
    export_composer(tiny, out_dir=out)
    export_composer(tiny, out_dir=out)  # re-export replaces it atomically
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    meta = json.loads((out / "config.json").read_text())
    assert meta["format_version"] == 2 and meta["lora"] == "unmerged"
    assert meta["composer"]["llm"] == "builtin:tiny-bert"
    _no_pickle(monkeypatch)
    again = load_composer(out)
    f = _feats(3, tiny.d_clip)
    a, b = _all_kinds(tiny, f, TEXTS), _all_kinds(again, f, TEXTS)
    for kind in a:
        assert (a[kind] - b[kind]).abs().max().item() < 1e-6, kind
    assert again.logit_scale.item() == tiny.logit_scale.item()


def test_query_encoder_on_images(tiny, tmp_path):
    from PIL import Image

    from cir.query_encoders import load_query_encoder as eval_loader

    out = export_composer(tiny, out_dir=tmp_path / "export")
    enc = eval_loader(f"checkpoint:{out}", "cir-tiny")
    assert enc.dim == tiny.embed_dim and enc.uses_images and enc.uses_texts
    images = [Image.new("RGB", (80, 64), c) for c in ("red", "blue", "green")]
    gal = enc.encode_gallery(images)
    q = enc.encode_queries(images, ["make it red", "bigger", None])
    assert gal.shape == q.shape == (3, tiny.embed_dim) and gal.dtype.name == "float32"
    pixels = torch.stack([tiny.preprocess(im) for im in images])
    with torch.no_grad():
        feats = tiny.image_features(pixels)
        want = tiny.encode_composed(feats[:2], ["make it red", "bigger"])
        img_q = tiny.encode_image_query(feats[2:])
        tgt = tiny.encode_target(feats)
    assert abs(q[:2] - want.numpy()).max() < 1e-5 and abs(q[2:] - img_q.numpy()).max() < 1e-5
    assert abs(gal - tgt.numpy()).max() < 1e-5


def _train(m, batch, objective, steps, lr=3e-3):
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=lr)
    loss = build_objective(m, LossConfig(objective=objective))
    losses = []
    m.train()
    for _ in range(steps):
        out = loss(batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    return losses


@pytest.mark.parametrize("objective,steps", [("infonce", 25), ("ptha", 40), ("collm3", 20)])
def test_a_few_steps_reduce_the_loss(objective, steps):
    m = _build(seed=3, lora_dropout=0.0)
    n = 12
    words = ["red", "blue", "green", "big", "small", "circle", "square", "left", "right", "top", "bottom", "add"]
    texts = [f"make it {words[i]} and {words[(5 * i + 1) % n]}" for i in range(n)]
    batch = {"ref_feats": _feats(n, m.d_clip, 5), "tgt_feats": _feats(n, m.d_clip, 6), "texts": texts,
             "reverse_texts": [f"undo {t}" for t in texts], "captions": [f"a {w} thing" for w in words]}
    losses = _train(m, batch, objective, steps)
    assert losses[-1] < 0.5 * losses[0], losses


def test_forward_takes_pixels_and_null_reverse_texts():
    m = _build(seed=4)
    px = torch.rand(4, 3, 64, 64)
    batch = {"ref_pixels": px, "tgt_pixels": px.flip(0), "texts": ["a", "b", "c", "d"],
             "reverse_texts": ["x", None, None, "y"]}
    out = build_objective(m, LossConfig(objective="ptha"))(batch)
    assert set(out) >= {"loss", "q2t", "t2t", "p2p", "logit_scale"} and out["loss"].requires_grad
    out["loss"].backward()
    assert m.visual.conv1.weight.grad is None  # frozen vision tower
    assert m.prototype_adapter.mlp[0].weight.grad is not None


def test_minilm_composer_with_lora_encodes_a_batch():
    m = _build(llm="minilm").eval()
    assert m.hidden == 384 and m.pooling == "mean"
    assert any("lora_" in n for n in _trainable(m))
    f = _feats(4, m.d_clip)
    kinds = _all_kinds(m, f, ["make it red", "a dog on a beach", "bigger", ""])
    for e in kinds.values():
        assert e.shape == (4, 128) and torch.isfinite(e).all()
