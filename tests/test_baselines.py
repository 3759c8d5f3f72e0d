"""Query-encoder baselines (image-only, text-only, sum) and the `load_query_encoder` factory.

The semantic checks use a hand-made encoder whose answers are known (an image's
vector is its colour, a text's vector the colour word it names); the real open_clip
path is checked on `cir-tiny` (random but seeded weights), where only identities hold.
"""
from __future__ import annotations

import sys
import types

import numpy as np
import pytest
from PIL import Image

from cir.baselines import BASELINES, BaselineQueryEncoder, l2_normalise
from cir.metrics import rank_by_similarity
from cir.query_encoders import QueryEncoder, check_query_spec, is_query_spec, load_query_encoder, parse_query_spec

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


class ColourClip:
    """Images -> their mean RGB (+ a constant 4th axis); texts -> the colour word named."""

    name = "colour-clip"
    dim = 4

    def __init__(self):
        self.image_calls = 0
        self.text_calls = 0

    def encode_images(self, images):
        self.image_calls += 1
        rows = [list(np.asarray(im, np.float32).reshape(-1, 3).mean(0) / 255) + [0.1] for im in images]
        return l2_normalise(np.array(rows))

    def encode_texts(self, texts):
        self.text_calls += 1
        rows = []
        for t in texts:
            v = [float(word in t) for word in COLOURS] + [0.0]
            rows.append(v if any(v) else [0, 0, 0, 1.0])
        return l2_normalise(np.array(rows, np.float32))


def solid(colour: str, size: int = 8) -> Image.Image:
    return Image.new("RGB", (size, size), COLOURS[colour])


GALLERY = ["red", "green", "blue"]


def ranked_names(enc, refs, texts):
    q = enc.encode_queries([solid(c) if c else None for c in refs], texts)
    g = enc.encode_gallery([solid(c) for c in GALLERY])
    order = rank_by_similarity(q, g, k=3)
    return [[GALLERY[i] for i in row] for row in order]


def test_image_only_ranks_the_reference_colour_first_and_ignores_text():
    enc = BaselineQueryEncoder("image-only", ColourClip())
    ranked = ranked_names(enc, ["blue", "green"], ["make it red", "make it red"])
    assert [r[0] for r in ranked] == ["blue", "green"]
    a = enc.encode_queries([solid("red")], ["make it blue"])
    b = enc.encode_queries([solid("red")], ["something else"])
    np.testing.assert_array_equal(a, b)
    assert enc.uses_images and not enc.uses_texts


def test_text_only_ranks_by_the_named_colour_and_needs_no_image():
    clip = ColourClip()
    enc = BaselineQueryEncoder("text-only", clip)
    ranked = ranked_names(enc, [None, None], ["now blue", "turn it green"])
    assert [r[0] for r in ranked] == ["blue", "green"]
    assert clip.image_calls == 1  # the gallery only: no reference image was encoded
    assert enc.uses_texts and not enc.uses_images


def test_sum_is_the_normalised_sum_and_combines_both():
    clip = ColourClip()
    enc = BaselineQueryEncoder("sum", clip)
    refs, texts = [solid("red"), solid("green")], ["now blue", "make it red"]
    got = enc.encode_queries(refs, texts)
    img, txt = clip.encode_images(refs), clip.encode_texts(texts)
    want = (img + txt) / np.linalg.norm(img + txt, axis=1, keepdims=True)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)
    # red + "blue" sits between red and blue (both near cos 0.71), far from green;
    # the image-only and text-only queries each find only one of them.
    g = enc.encode_gallery([solid(c) for c in GALLERY])
    scores = (got[:1] @ g.T)[0]
    assert abs(scores[0] - scores[2]) < 0.01 and scores[1] < min(scores[0], scores[2]) - 0.5


def test_baselines_check_their_inputs():
    enc = BaselineQueryEncoder("sum", ColourClip())
    with pytest.raises(ValueError, match="reference images"):
        enc.encode_queries([solid("red")], ["a", "b"])
    with pytest.raises(ValueError, match="needs every reference image"):
        enc.encode_queries([None], ["blue"])
    assert enc.encode_queries([], []).shape == (0, 4)
    assert enc.encode_gallery([]).shape == (0, 4)
    with pytest.raises(ValueError, match="unknown baseline"):
        BaselineQueryEncoder("average", ColourClip())
    assert isinstance(enc, QueryEncoder)
    assert enc.name == "baseline:sum@colour-clip"


def test_spec_parsing_and_errors(tmp_path):
    assert [parse_query_spec(f"baseline:{b}").value for b in BASELINES] == list(BASELINES)
    assert str(parse_query_spec("checkpoint:/x/y")) == "checkpoint:/x/y"
    assert is_query_spec("baseline:sum") and is_query_spec(" checkpoint:/x") and not is_query_spec("cir-tiny")
    for bad in ("", "sum", "baseline:avg", "baseline:", "clip:ViT-B-32", "checkpoint:"):
        with pytest.raises(ValueError):
            parse_query_spec(bad)
    with pytest.raises(ValueError, match="--encoder"):
        check_query_spec("baseline:sum", None)
    with pytest.raises(ValueError, match="unknown encoder model"):
        check_query_spec("baseline:sum", "no-such-clip")
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        check_query_spec(f"checkpoint:{tmp_path / 'missing.safetensors'}")


def test_checkpoint_specs_go_to_cir_models(tmp_path, monkeypatch):
    calls = []
    fake = types.ModuleType("cir.models")

    def fake_loader(path, **kwargs):
        calls.append((path, kwargs))
        return BaselineQueryEncoder("sum", ColourClip())

    fake.load_query_encoder = fake_loader
    monkeypatch.setitem(sys.modules, "cir.models", fake)
    ckpt = tmp_path / "export"
    ckpt.mkdir()
    enc = load_query_encoder(f"checkpoint:{ckpt}", "cir-tiny", threads=1)
    assert isinstance(enc, QueryEncoder)
    assert calls == [(str(ckpt), {"encoder": "cir-tiny", "device": None, "threads": 1,
                                  "precision": "fp32"})]


# ---- the real open_clip path ----------------------------------------------------
@pytest.fixture(scope="module")
def tiny_sum():
    return load_query_encoder("baseline:sum", encoder="cir-tiny", threads=2)


def shapes_images():
    from cir.data.shapes import random_scene, render

    rng = np.random.default_rng(3)
    return [render(random_scene(rng, 1, 4), 64, seed=i) for i in range(6)]


def test_cir_tiny_baselines_share_one_space(tiny_sum):
    import torch

    images = shapes_images()
    texts = [f"make the shape {c}" for c in ("red", "blue", "green", "red", "purple", "yellow")]
    clip = tiny_sum.clip
    image_only = BaselineQueryEncoder("image-only", clip)
    text_only = BaselineQueryEncoder("text-only", clip)
    g = tiny_sum.encode_gallery(images)
    assert g.shape == (6, tiny_sum.dim) and g.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(g, axis=1), 1.0, atol=1e-5)
    # image-only: a query whose reference is a gallery image ranks that image first.
    q = image_only.encode_queries(images, texts)
    np.testing.assert_allclose(q, g, atol=1e-5)
    assert rank_by_similarity(q, g, k=1)[:, 0].tolist() == list(range(6))
    # sum = normalise(image + text), each part from the same encoder.
    t = text_only.encode_queries([None] * 6, texts)
    want = l2_normalise(g + t)
    np.testing.assert_allclose(tiny_sum.encode_queries(images, texts), want, atol=1e-5)
    # The same spec builds the same (seeded) random weights in any process, and the
    # caller's torch RNG is left alone.
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    again = load_query_encoder("baseline:image-only", encoder="cir-tiny", threads=2)
    assert torch.rand(1).item() == before.item()
    np.testing.assert_allclose(again.encode_gallery(images), g, atol=1e-6)
    assert again.name == "baseline:image-only@cir-tiny" and again.encoder == "cir-tiny"
