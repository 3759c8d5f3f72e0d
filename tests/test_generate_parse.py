"""Parsing model answers into modification texts: real SmolLM2 answers (the fixture)
and the shapes larger models answer in."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from cir.generate.parse import parse_texts

FIXTURE = Path(__file__).parent / "fixtures" / "smollm2_answers.jsonl"
SMOLLM2 = [json.loads(line) for line in FIXTURE.read_text().splitlines() if line.strip()]


def test_the_fixture_covers_what_smollm2_really_emits():
    assert len(SMOLLM2) >= 25
    assert any(case["truncated"] for case in SMOLLM2) and any(not case["texts"] for case in SMOLLM2)
    assert {case["prompt"] for case in SMOLLM2} >= {"modify.v1", "reverse.v1"}


@pytest.mark.parametrize("case", SMOLLM2, ids=[c["note"][:40] for c in SMOLLM2])
def test_smollm2_answers(case):
    assert parse_texts(case["answer"], case["truncated"]) == case["texts"]


@pytest.mark.parametrize("answer, texts", [
    ("", []),
    ("   \n\n ", []),
    ("make the circle blue", ["make the circle blue"]),
    ('"Make the circle blue."', ["Make the circle blue"]),
    ("“make the circle blue”", ["make the circle blue"]),
    ("Sure! Here are three requests:\n\n1. make the circle blue\n2. turn the circle blue\n3. recolour it blue\n\n"
     "I hope this helps!", ["make the circle blue", "turn the circle blue", "recolour it blue"]),
    ("1) make it red\n2) make it larger", ["make it red", "make it larger"]),
    ("- make it red\n- make it larger\n* add a star", ["make it red", "make it larger", "add a star"]),
    ("• make it red\n• make it larger", ["make it red", "make it larger"]),
    ("1. make it red 2. make it larger 3. add a star", ["make it red", "make it larger", "add a star"]),
    ("**Request 1:** make it red\n**Request 2:** make it larger", ["make it red", "make it larger"]),
    ("Here are 2 requests:\n1. \"make it red\"\n2. 'make it larger'.", ["make it red", "make it larger"]),
    ("First picture: a small red circle.\nSecond picture: a small blue circle.\nmake the circle blue",
     ["make the circle blue"]),
    ("1. make it red\n2. make it red", ["make it red", "make it red"]),     # duplicates: the filter's job
])
def test_answer_shapes(answer, texts):
    assert parse_texts(answer) == texts


def test_a_truncated_answer_loses_its_cut_line():
    assert parse_texts("1. make it red\n2. make it larger\n3. add a sm", truncated=True) == \
        ["make it red", "make it larger"]
    assert parse_texts("make the circle of the large orange", truncated=True) == []
