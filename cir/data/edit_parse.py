"""The exact checker of shapes texts: a modification text (either phrasing family of
`cir.data.edits`) parsed back into edits of the reference scene, and a caption parsed
back into its scene.

A text is right when it means exactly one thing and that thing is the target: every way
of reading it (clause boundaries, where a referring expression ends) that names objects
which are really there, one each, is applied to the reference, and the text is exact
only if all readings yield the target scene. A text that reads two ways is wrong, even
if one reading is right: a retrieval model trained on it would learn the ambiguity.

The grammar is read from the generators' own wording tables in `cir.data.edits`, so a
new wording there is understood here without a second copy.
"""
from __future__ import annotations

import re
from functools import lru_cache

from cir.data.edits import (
    _H_AT, _H_SIZE, _H_SIZE_NEW, _H_SIZE_VERB, _H_TEMPLATES, _H_TO, Edit, apply_edit,
)
from cir.data.shapes import CELLS, COLOURS, PREPOSITIONS, SHAPES, SIZES, Obj, Scene, parse_caption

MAX_CLAUSES = 16  # more edits than two scenes of 9 cells can differ by
# Where two clauses may meet: the human joiners, and the synthetic family's list
# punctuation ("a, b and c").
_SEPARATORS = (", and ", "; also ", ", then ", " and ", ", ")

_SIZE_WORD = {w: size for size, words in _H_SIZE.items() for w in words}
_SIZE_NEW = {w: size for size, words in _H_SIZE_NEW.items() for w in words}
_SIZE_VERB = {w: size for size, words in _H_SIZE_VERB.items() for w in words}
_AT = {phrase: cell for cell, phrases in _H_AT.items() for phrase in phrases}
_AT.update({f"{PREPOSITIONS[c]} the {c}": c for c in CELLS})  # the synthetic locatives
_TO = {phrase: cell for cell, phrases in _H_TO.items() for phrase in phrases}
_FROM_TO = {f"the {c}": c for c in CELLS}  # "move the ... from the left to the top"
_AT_PLACE = {p: c for p, c in _AT.items() if p.split()[0] in ("in", "at", "on")}


def _alt(words) -> str:
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


# A referring expression: [size] [colour] (shape | "one" | "shape") [where].
_REFER = re.compile(
    rf"(?:(?P<size>{_alt(_SIZE_WORD)}) )?(?:(?P<colour>{_alt(COLOURS)}) )?"
    rf"(?P<shape>{_alt(SHAPES)}|one|shape)(?: (?P<where>{_alt(_AT)}))?"
)
_LOOK_WORDS = rf"(?:{_alt(_SIZE_WORD)}) (?:{_alt(COLOURS)}) (?:{_alt(SHAPES)})"  # a full look
_LOOK = re.compile(rf"(?P<size>{_alt(_SIZE_WORD)}) (?P<colour>{_alt(COLOURS)}) (?P<shape>{_alt(SHAPES)})")

# Synthetic templates (`edits._synthetic`), in the same slot notation as the human ones.
_SYNTHETIC = {
    "colour": ("make the {the} {new}",),
    "size": ("make the {the} {new}",),
    "shape": ("change the {the} into a {new}",),
    "add": ("add a {obj} {at}",),
    "remove": ("remove the {the}",),
    "move": ("move the {look} from {from} to {dest}",),
}
_SLOT = re.compile(r"\{(\w+)\}")
_THE = "\x00"  # stands for the referring expression being tried (see `_clause_readings`)
_SLOT_PATTERNS = {
    "the": re.escape(_THE),
    "new": _alt(set(COLOURS) | set(SHAPES) | set(SIZES) | set(_SIZE_NEW)),
    "at": _alt(_AT), "to": _alt(_TO), "verb": _alt(_SIZE_VERB),
    "obj": _LOOK_WORDS, "look": _LOOK_WORDS,
    "from": _alt(_FROM_TO), "dest": _alt(_FROM_TO),
}


def _templates():
    for kind in _SYNTHETIC:
        for t in _SYNTHETIC[kind] + _H_TEMPLATES[kind]:
            yield kind, t


@lru_cache(maxsize=None)
def _template_regex(template: str) -> re.Pattern:
    """A template as a regex: fixed words literal, each slot its closed vocabulary, and
    the referring expression a placeholder that `_clause_readings` fills span by span."""
    parts, pos = [], 0
    for m in _SLOT.finditer(template):
        parts.append(re.escape(template[pos:m.start()]))
        parts.append(f"(?P<{m.group(1)}>{_SLOT_PATTERNS[m.group(1)]})")
        pos = m.end()
    parts.append(re.escape(template[pos:]))
    return re.compile("".join(parts))


def _refer(scene: Scene, phrase: str) -> Obj | None:
    """The one object of `scene` a referring expression names, or None."""
    m = _REFER.fullmatch(phrase)
    if m is None:
        return None
    size = _SIZE_WORD.get(m["size"]) if m["size"] else None
    shape = m["shape"] if m["shape"] in SHAPES else None
    cell = _AT[m["where"]] if m["where"] else None
    found = [o for o in scene.objects
             if (size is None or o.size == size) and (m["colour"] is None or o.colour == m["colour"])
             and (shape is None or o.shape == shape) and (cell is None or o.cell == cell)]
    return found[0] if len(found) == 1 else None


def _look(phrase: str, cell: str) -> Obj | None:
    m = _LOOK.fullmatch(phrase)
    return None if m is None else Obj(m["shape"], m["colour"], _SIZE_WORD[m["size"]], cell)


def _new_value(kind: str, word: str):
    if kind == "colour":
        return word if word in COLOURS else None
    if kind == "shape":
        return word if word in SHAPES else None
    return _SIZE_NEW.get(word) or (word if word in SIZES else None)


def _edit(kind: str, slots: dict, scene: Scene) -> Edit | None:
    """The edit a filled template means on `scene`, or None if it names nothing there."""
    try:
        if kind == "add":
            cell = _AT.get(slots["at"])
            obj = _look(slots["obj"], cell) if cell else None
            return Edit("add", obj) if obj else None
        if kind == "move" and "look" in slots:  # synthetic: "move the X from the A to the B"
            src, dst = _FROM_TO.get(slots["from"]), _FROM_TO.get(slots["dest"])
            obj = _refer(scene, f"{slots['look']} {_at_of(src)}") if src else None
            return Edit("move", obj, dst) if obj and dst else None
        obj = _refer(scene, slots["the"])
        if obj is None:
            return None
        if kind == "remove":
            return Edit("remove", obj)
        if kind == "move":
            dst = _TO.get(slots["to"]) if "to" in slots else _AT_PLACE.get(slots.get("at"))
            return Edit("move", obj, dst) if dst else None
        new = _SIZE_VERB.get(slots["verb"]) if "verb" in slots else _new_value(kind, slots["new"])
        return Edit(kind, obj, new) if new else None
    except ValueError:  # an edit that changes nothing
        return None


def _at_of(cell: str) -> str:
    return f"{PREPOSITIONS[cell]} the {cell}"


def _clause_readings(clause: str, scene: Scene) -> list[Edit]:
    """Every edit `clause` can mean on `scene` (usually one; none if it does not parse).

    A referring expression's end is not marked, so every word span that reads as one is
    tried in turn (as the placeholder `_THE`) against every template."""
    words = clause.split(" ")
    spans = [None] + [(i, j) for i in range(len(words)) for j in range(i + 1, len(words) + 1)
                      if _REFER.fullmatch(" ".join(words[i:j]))]
    edits = []
    for span in spans:
        text, phrase = clause, None
        if span is not None:
            phrase = " ".join(words[span[0]:span[1]])
            text = " ".join(words[:span[0]] + [_THE] + words[span[1]:])
        for kind, template in _templates():
            if (phrase is None) == ("{the}" in template):
                continue
            m = _template_regex(template).fullmatch(text)
            if m is None:
                continue
            slots = {k: (phrase if v == _THE else v) for k, v in m.groupdict().items()}
            e = _edit(kind, slots, scene)
            if e is not None and e not in edits:
                edits.append(e)
    return edits


def _normalise(text: str) -> str:
    return " ".join(text.strip().rstrip(".").split()).lower().replace("i want", "I want")


def _cuts(text: str) -> list[tuple[int, int]]:
    """(start, end) of every place two clauses may meet, overlapping ones included."""
    cuts = []
    for sep in _SEPARATORS:
        i = text.find(sep)
        while i >= 0:
            cuts.append((i, i + len(sep)))
            i = text.find(sep, i + 1)
    return sorted(cuts)


def readings(text: str, scene: Scene) -> set[Scene]:
    """Every scene that `text`, read as a sequence of edits of `scene`, can lead to."""
    text = _normalise(text)
    cuts = _cuts(text)

    def read_from(pos: int, current: Scene, depth: int) -> set[Scene]:
        out: set[Scene] = set()
        ends = [c for c in cuts if c[0] > pos] if depth < MAX_CLAUSES else []
        for start, resume in ends + [(len(text), None)]:
            for edit in _clause_readings(text[pos:start], current):
                if not _fits(current, edit):
                    continue
                after = apply_edit(current, edit)
                out |= {after} if resume is None else read_from(resume, after, depth + 1)
        return out

    return read_from(0, scene, 1)


def _fits(scene: Scene, edit: Edit) -> bool:
    try:
        apply_edit(scene, edit)
    except ValueError:
        return False
    return True


def text_is_exact(text: str, ref: Scene, tgt: Scene) -> bool:
    """True when `text` turns `ref` into `tgt` and into nothing else."""
    return readings(text, ref) == {tgt}


def caption_is_exact(text: str, scene: Scene) -> bool:
    """True when `text` is the canonical caption of `scene`."""
    try:
        return parse_caption(text.strip()) == scene
    except ValueError:
        return False


def is_exact(task: str, text: str, caption_a: str, caption_b: str | None = None) -> bool:
    """A generated text checked against the images' exact captions: task "caption"
    (the caption of image a) or "modification" (the text that turns a into b)."""
    from cir.data.shapes import parse_caption

    if task == "caption":
        return caption_is_exact(text, parse_caption(caption_a))
    return text_is_exact(text, parse_caption(caption_a), parse_caption(caption_b))


__all__ = ["caption_is_exact", "is_exact", "readings", "text_is_exact"]
