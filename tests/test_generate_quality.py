"""The quality filter of generated texts: each reason, the reverse texts, directions."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from cir.generate.quality import FilterConfig, QualityFilter, caption_similarity, pair_directions, text_reason
from cir.schemas import embedding_array

REF = "a small red circle at the top left, a large blue square in the centre"
TGT = "a small blue circle at the top left, a large blue square in the centre"


@pytest.mark.parametrize("text, reason", [
    ("", "empty"),
    ("  ...  ", "empty"),
    ("blue", "too_short"),
    ("make " + "it very " * 20 + "blue", "too_long"),
    (REF, "copies_caption"),
    (TGT + ".", "copies_caption"),
    ("A small blue circle at the top left, a large blue square in the centre!", "copies_caption"),
    ("make the circle blue", ""),
    ("make the small red circle at the top left blue", ""),
])
def test_text_reasons(text, reason):
    assert text_reason(text, REF, TGT, FilterConfig(min_words=2, max_words=25)) == reason


def test_caption_similarity_is_word_level():
    assert caption_similarity(REF, REF) == 1.0
    assert caption_similarity("make the circle blue", REF) < 0.3


def candidates(texts, repeats=None, reverse=None, directions=None) -> pa.Table:
    n = len(texts)
    cols = {
        "text": texts,
        "reverse_text": reverse or ["make the circle red"] * n,
        "ref_caption": [REF] * n,
        "tgt_caption": [TGT] * n,
        "repeats": repeats or [False] * n,
    }
    table = pa.table(cols)
    if directions is not None:
        table = table.append_column("direction", embedding_array(directions))
    return table


def test_filter_reasons_duplicates_and_reverse_texts():
    f = QualityFilter(FilterConfig(min_words=3))
    out = f(candidates(["make the circle blue", "make the circle blue", "blue", REF, ""],
                       repeats=[False, True, False, False, False],
                       reverse=["make the circle red", "red", REF, None, "make the circle red"]))
    assert out.column("drop_reason").to_pylist() == ["", "duplicate", "too_short", "copies_caption", "empty"]
    # A reverse text that fails the checks becomes null; its row stays.
    assert out.column("reverse_text").to_pylist() == ["make the circle red", None, None, None,
                                                      "make the circle red"]
    assert out.column("direction_score").null_count == 5


def test_direction_check_uses_the_encoders_text_tower():
    from cir.encoders import ClipEncoder

    texts = ["make the circle blue", "turn the square into a triangle", "add a green star"]
    emb = ClipEncoder("cir-shapes").encode_texts(texts)
    # Directions equal to (or opposite to) each text's own embedding: cosine +1 / -1.
    directions = np.stack([emb[0], -emb[1], emb[2]])
    f = QualityFilter(FilterConfig(min_direction_score=0.0), encoder="cir-shapes")
    out = f(candidates(texts, directions=directions))
    assert out.column("drop_reason").to_pylist() == ["", "direction", ""]
    scores = out.column("direction_score").to_pylist()
    assert scores[0] == pytest.approx(1.0, abs=1e-4) and scores[1] == pytest.approx(-1.0, abs=1e-4)


def test_pair_directions_are_unit_differences():
    ids = ["a", "b", "c"]
    vectors = np.eye(3, dtype=np.float32)
    d = pair_directions(["a", "c"], ["b", "a"], ids, vectors).to_pylist()
    np.testing.assert_allclose(d[0], np.array([-1, 1, 0]) / np.sqrt(2), atol=1e-6)
    np.testing.assert_allclose(d[1], np.array([1, 0, -1]) / np.sqrt(2), atol=1e-6)


@pytest.mark.parametrize("kwargs", [{"min_words": 0}, {"max_words": 1, "min_words": 2},
                                    {"max_caption_similarity": 0}, {"min_direction_score": 2}])
def test_bad_filter_settings_are_refused(kwargs):
    with pytest.raises(ValueError, match="filter"):
        FilterConfig(**kwargs).validate()
