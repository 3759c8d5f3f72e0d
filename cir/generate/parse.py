"""Turn what a chat model answers into modification texts.

Small and large models answer a "write N requests" prompt in many shapes: a numbered
or bulleted list, one text per line or all on one line, quoted, after a preamble
("Sure! Here are three requests:"), followed by a sign-off, with the prompt's captions
echoed back, or nothing at all. `parse_texts` returns the texts in the order given,
cleaned, without judging them: the quality filter (`cir.generate.quality`) does that.
`tests/fixtures/smollm2_answers.jsonl` holds real SmolLM2 answers and what each must
parse to.
"""
from __future__ import annotations

import re

# "1.", "1)", "(1)", "#1", "1:", "Request 1:", bullets.
_ITEM = re.compile(
    r"^\s*(?:(?:\(?\d{1,2}[.):]|#\d{1,2}[.:]?)\s+|[-*•·–]\s+|(?:request|instruction|text|option|edit)\s*\d{0,2}\s*[:.)-]\s*)",
    re.IGNORECASE)
# An inline list: "1. make it red 2. make it blue" -> split before each number.
_INLINE_ITEM = re.compile(r"\s+(?=\(?\d{1,2}[.)]\s+\S)")
_PREAMBLE = re.compile(
    r"^(?:sure|certainly|of course|okay|ok|here(?:'s| is| are)|below (?:is|are)|the following)\b",
    re.IGNORECASE)
_SIGN_OFF = re.compile(r"^(?:i hope|hope this|let me know|note:|these requests|feel free|i've|i have)",
                       re.IGNORECASE)
_ECHO = re.compile(r"^(?:(?:first|second) (?:picture|image)\s*:|write \d+ .*requests?\W*$)", re.IGNORECASE)
_QUOTES = "\"'“”‘’`"


def parse_texts(answer: str, truncated: bool = False) -> list[str]:
    """The modification texts in one model answer, in order (possibly none).

    In a list, only its items count: prose around it (a preamble, a comment after it)
    is dropped. Lines that echo the prompt are dropped; a text that copies a caption is
    kept for the quality filter to count. `truncated` (the answer hit its token budget)
    drops the answer's last line or list item, which was cut mid-sentence."""
    if not answer or not answer.strip():
        return []
    lines = [ln.strip().replace("**", "").replace("__", "")
             for ln in answer.replace("\r", "\n").split("\n") if ln.strip()]
    if len(lines) == 1:
        lines = [ln.strip() for ln in _INLINE_ITEM.split(lines[0])]
    if truncated:
        lines = lines[:-1]
    items = [bool(_ITEM.match(ln)) for ln in lines]
    is_list = sum(items) >= 2
    texts = []
    for line, is_item in zip(lines, items):
        if (is_list and not is_item) or _ECHO.match(line) or _SIGN_OFF.match(line):
            continue
        if not is_item and (_PREAMBLE.match(line) or line.endswith(":")):
            continue
        text = _clean(_ITEM.sub("", line, count=1))
        if text:
            texts.append(text)
    return texts


def _clean(text: str) -> str:
    text = text.strip()
    # A trailing explanation in brackets, and quotes around the whole text.
    text = re.sub(r"\s*\([^)]*\)\s*$", "", text)
    while len(text) >= 2 and text[0] in _QUOTES and text[-1] in _QUOTES + ".":
        text = text[1:-1].strip() if text[-1] in _QUOTES else text[1:-2].strip()
    text = text.strip(_QUOTES).strip()
    return text.rstrip(".!;,").strip()
