"""Edits of shapes scenes, the exact difference between two scenes, and the texts for it.

A composed-retrieval triplet needs a modification text that says exactly how the target
differs from the reference. Here that text is derived, not annotated: `diff` names every
difference as a list of edits and `edit_text` words them. There are two phrasing
families on purpose:

* "synthetic": one fixed template per edit kind, what the project's template text
  generator produces for training; exactly reproducible, so tests can pin strings.
* "human": several wordings per kind, with varied word order, synonyms and shortened
  references. The benchmark queries use it, so that a model trained on synthetic texts
  is tested on phrasing it never saw (the gap real benchmarks have).

Edits in a list apply *in sequence*: each edit names its object as it is just before
that edit (for a reference scene and a single edit: as it is in the reference).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cir.data.shapes import (
    CELLS, COLOURS, SHAPES, SIZES, Obj, Scene, describe, locative, random_obj,
)

KINDS = ("colour", "shape", "size", "add", "remove", "move")
ATTRIBUTES = ("colour", "shape", "size")  # the kinds that change one attribute in place
_ALLOWED_NEW = {"colour": COLOURS, "shape": SHAPES, "size": SIZES, "move": CELLS}
PHRASINGS = ("synthetic", "human")


@dataclass(frozen=True)
class Edit:
    """One change to a scene.

    `obj` is the object the edit acts on as it is before the edit (for "add": the object
    that is added). `new` is the new colour / shape / size, or for "move" the new cell;
    None for "add" and "remove".
    """

    kind: str
    obj: Obj
    new: str | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown edit kind {self.kind!r}; expected one of {KINDS}")
        if self.kind in ("add", "remove"):
            if self.new is not None:
                raise ValueError(f"a {self.kind} edit takes no new value, got {self.new!r}")
            return
        allowed = _ALLOWED_NEW[self.kind]
        if self.new not in allowed:
            raise ValueError(f"{self.kind} edit: {self.new!r} is not one of {allowed}")
        current = self.obj.cell if self.kind == "move" else getattr(self.obj, self.kind)
        if self.new == current:
            raise ValueError(f"{self.kind} edit changes nothing ({self.new!r} already)")


def apply_edit(scene: Scene, edit: Edit) -> Scene:
    """The scene after `edit`; ValueError if the edit does not fit the scene (its object
    is not there exactly as named, or its destination cell is taken)."""
    objs = list(scene.objects)
    if edit.kind == "add":
        if scene.at(edit.obj.cell) is not None:
            raise ValueError(f"cannot add to the occupied cell {edit.obj.cell!r}")
        return Scene(tuple(objs + [edit.obj]))
    if edit.obj not in objs:
        raise ValueError(f"{edit.kind} edit: the scene has no {describe(edit.obj)} "
                         f"{locative(edit.obj.cell)}")
    objs.remove(edit.obj)
    if edit.kind == "remove":
        if not objs:
            raise ValueError("cannot remove the last object of a scene")
        return Scene(tuple(objs))
    if edit.kind == "move":
        if scene.at(edit.new) is not None:
            raise ValueError(f"cannot move to the occupied cell {edit.new!r}")
        return Scene(tuple(objs + [edit.obj.replace(cell=edit.new)]))
    return Scene(tuple(objs + [edit.obj.replace(**{edit.kind: edit.new})]))


def apply_edits(scene: Scene, edits) -> Scene:
    """Apply edits in sequence."""
    for e in edits:
        scene = apply_edit(scene, e)
    return scene


def valid_kinds(scene: Scene, max_objects: int = 4) -> list[str]:
    """Edit kinds that make sense on `scene`, in KINDS order: add needs room (a free cell
    and fewer than max_objects), remove needs a second object so scenes never become
    empty, move needs a free cell."""
    n, free = len(scene.objects), len(scene.empty_cells())
    ok = {"colour": True, "shape": True, "size": True,
          "add": free > 0 and n < max_objects, "remove": n >= 2, "move": free > 0}
    return [k for k in KINDS if ok[k]]


def _other(rng: np.random.Generator, values, current):
    choices = [v for v in values if v != current]
    return choices[int(rng.integers(len(choices)))]


def random_edit(rng: np.random.Generator, scene: Scene, max_objects: int = 4) -> Edit:
    """A uniformly random valid edit kind, then a uniformly random object and value."""
    kinds = valid_kinds(scene, max_objects)
    kind = kinds[int(rng.integers(len(kinds)))]
    if kind == "add":
        free = scene.empty_cells()
        return Edit("add", random_obj(rng, free[int(rng.integers(len(free)))]))
    obj = scene.objects[int(rng.integers(len(scene.objects)))]
    if kind == "remove":
        return Edit("remove", obj)
    if kind == "move":
        free = scene.empty_cells()
        return Edit("move", obj, free[int(rng.integers(len(free)))])
    return Edit(kind, obj, _other(rng, _ALLOWED_NEW[kind], getattr(obj, kind)))


def diff(ref: Scene, tgt: Scene) -> list[Edit]:
    """The edits that turn `ref` into `tgt`, naming every difference, in canonical order.

    Objects in the same cell correspond; each differing attribute is its own edit
    (colour, then shape, then size, each naming the object as the previous one left it).
    Leftover objects with the same look are paired as moves (in cell order), the rest
    of ref's leftovers are removes and the rest of tgt's are adds. Order: attribute
    edits by cell, moves by source cell, adds, then removes; adds before removes keeps
    every intermediate scene non-empty. `apply_edits(ref, diff(ref, tgt)) == tgt`.
    """
    edits: list[Edit] = []
    lone_ref, lone_tgt = [], []
    for cell in CELLS:
        a, b = ref.at(cell), tgt.at(cell)
        if a is not None and b is not None:
            for attr in ATTRIBUTES:
                if getattr(a, attr) != getattr(b, attr):
                    edits.append(Edit(attr, a, getattr(b, attr)))
                    a = a.replace(**{attr: getattr(b, attr)})
        elif a is not None:
            lone_ref.append(a)
        elif b is not None:
            lone_tgt.append(b)
    for a in list(lone_ref):
        match = next((b for b in lone_tgt if b.look == a.look), None)
        if match is not None:
            edits.append(Edit("move", a, match.cell))
            lone_ref.remove(a)
            lone_tgt.remove(match)
    edits += [Edit("add", b) for b in lone_tgt]
    edits += [Edit("remove", a) for a in lone_ref]
    return edits


# ------------------------------------------------------------------ synthetic texts

def _synthetic(e: Edit) -> str:
    """The one canonical template per kind (see module docstring)."""
    the = f"the {describe(e.obj)} {locative(e.obj.cell)}"
    if e.kind in ("colour", "size"):
        return f"make {the} {e.new}"
    if e.kind == "shape":
        return f"change {the} into a {e.new}"
    if e.kind == "add":
        return f"add a {describe(e.obj)} {locative(e.obj.cell)}"
    if e.kind == "remove":
        return f"remove {the}"
    return f"move the {describe(e.obj)} from the {e.obj.cell} to the {e.new}"


def _join(parts: list[str]) -> str:
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


# ---------------------------------------------------------------------- human texts
# Several wordings per kind. `{the}` is a referring expression that picks out the
# object in the scene (always with its position, or with a look that is unique).

_H_SIZE = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
_H_AT = {  # where an object is
    "top left": ("in the top left", "at the top left", "in the top-left corner", "top left"),
    "top": ("at the top", "at the top in the middle", "top middle"),
    "top right": ("in the top right", "at the top right", "in the top-right corner", "top right"),
    "left": ("on the left", "on the left side", "middle left"),
    "centre": ("in the centre", "in the middle", "in the very middle"),
    "right": ("on the right", "on the right side", "middle right"),
    "bottom left": ("in the bottom left", "at the bottom left", "in the bottom-left corner",
                    "bottom left"),
    "bottom": ("at the bottom", "at the bottom in the middle", "bottom middle"),
    "bottom right": ("in the bottom right", "at the bottom right",
                     "in the bottom-right corner", "bottom right"),
}
_H_TO = {  # where an object goes
    "top left": ("the top left", "the top-left corner"),
    "top": ("the top middle", "the middle of the top row"),
    "top right": ("the top right", "the top-right corner"),
    "left": ("the left side", "the middle of the left edge"),
    "centre": ("the centre", "the middle"),
    "right": ("the right side", "the middle of the right edge"),
    "bottom left": ("the bottom left", "the bottom-left corner"),
    "bottom": ("the bottom middle", "the middle of the bottom row"),
    "bottom right": ("the bottom right", "the bottom-right corner"),
}
_H_TEMPLATES = {
    "colour": ("the {the} should be {new} instead", "I want the {the} recoloured to {new}",
               "same picture but the {the} is {new}", "paint the {the} {new}",
               "turn the {the} {new}"),
    "shape": ("swap the {the} for a {new}", "the {the} should be a {new} instead",
              "replace the {the} with a {new} of the same colour and size",
              "I want a {new} where the {the} is"),
    "size": ("the {the} should be {new}", "I want the {the} to be {new}",
             "same but the {the} is {new}", "{verb} the {the}"),
    "add": ("same but with an extra {obj} {at}", "put a {obj} {at} too",
            "there should also be a {obj} {at}", "add one more shape: a {obj} {at}"),
    "remove": ("get rid of the {the}", "take away the {the}", "the {the} should not be there",
               "same picture without the {the}", "delete the {the}"),
    "move": ("shift the {the} over to {to}", "the {the} should be {at} instead",
             "put the {the} {at}", "move the {the} so it sits {at}"),
}
_H_SIZE_NEW = {"small": ("smaller", "small", "little"), "large": ("bigger", "larger", "big")}
_H_SIZE_VERB = {"small": ("shrink", "scale down"), "large": ("enlarge", "scale up")}
_H_JOIN = (", and {b}", "; also {b}", ", then {b}", " and {b}")


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _h_look(rng, obj: Obj, fields) -> str:
    words = []
    if "size" in fields:
        words.append(_pick(rng, _H_SIZE[obj.size]))
    if "colour" in fields:
        words.append(obj.colour)
    words.append(obj.shape if "shape" in fields else _pick(rng, ("one", "shape")))
    return " ".join(words)


_LOOK_SUBSETS = (("size", "colour", "shape"), ("colour", "shape"), ("size", "shape"),
                 ("shape",), ("colour",))


def _h_refer(rng, obj: Obj, ref: Scene | None, cur: Scene | None) -> str:
    """A referring expression for `obj` that is unambiguous in the scene the reader sees.

    With a position it is always unambiguous (one object per cell), whatever attributes
    are kept. Without a position only a look that matches exactly one object, in the
    reference and in the current scene, and only for an object untouched so far.
    """
    fields = _LOOK_SUBSETS[int(rng.integers(len(_LOOK_SUBSETS)))]
    unique_look = (
        ref is not None and cur is not None and obj in ref.objects
        and all(sum(all(getattr(o, f) == getattr(obj, f) for f in fields) for o in s.objects) == 1
                for s in (ref, cur))
    )
    look = _h_look(rng, obj, fields)
    if unique_look and rng.random() < 0.5:
        return look
    if rng.random() < 0.5:
        return f"{look} {_pick(rng, _H_AT[obj.cell])}"
    return f"{_h_look(rng, obj, ('size', 'colour', 'shape'))} {_pick(rng, _H_AT[obj.cell])}"


def _human(rng, e: Edit, ref: Scene | None, cur: Scene | None, first: bool) -> str:
    # "same but ..." only reads well at the start of a text.
    template = _pick(rng, [t for t in _H_TEMPLATES[e.kind] if first or not t.startswith("same")])
    fill = {}
    if e.kind == "add":
        fill = {"obj": _h_look(rng, e.obj, ("size", "colour", "shape")),
                "at": _pick(rng, _H_AT[e.obj.cell])}
    else:
        fill["the"] = _h_refer(rng, e.obj, ref, cur)
    if e.kind in ("colour", "shape"):
        fill["new"] = e.new
    elif e.kind == "size":
        fill["new"] = _pick(rng, _H_SIZE_NEW[e.new])
        fill["verb"] = _pick(rng, _H_SIZE_VERB[e.new])
    elif e.kind == "move":
        fill["to"] = _pick(rng, _H_TO[e.new])
        fill["at"] = _pick(rng, [a for a in _H_AT[e.new] if a.split()[0] in ("in", "at", "on")])
    return template.format(**fill)


def edit_text(edits: list[Edit], phrasing: str = "synthetic", rng=None,
              scene: Scene | None = None) -> str:
    """Word a sequence of edits.

    "synthetic" is deterministic and ignores `rng` and `scene`. "human" draws its wording
    from `rng` (required); pass the scene the edits start from as `scene` to allow
    shortened references like "the big blue square" where they are unambiguous.
    """
    if phrasing not in PHRASINGS:
        raise ValueError(f"unknown phrasing {phrasing!r}; expected one of {PHRASINGS}")
    edits = list(edits)
    if not edits:
        raise ValueError("no edits to describe")
    if phrasing == "synthetic":
        return _join([_synthetic(e) for e in edits])
    if rng is None:
        raise ValueError("human phrasing needs an rng (numpy.random.Generator)")
    cur = scene
    text = ""
    for i, e in enumerate(edits):
        part = _human(rng, e, scene, cur, first=i == 0)
        if i > 0:
            joins = [j for j in _H_JOIN if "also" not in j or "also" not in part]
            part = _pick(rng, joins).format(b=part)
        text += part
        cur = apply_edit(cur, e) if cur is not None else None
    return text


def modification_texts(ref: Scene, tgt: Scene, phrasing: str = "synthetic",
                       rng=None) -> tuple[str, str]:
    """(forward, reverse) texts: ref -> tgt, and tgt -> ref (the reverse text of MTST)."""
    if ref == tgt:
        raise ValueError("reference and target are the same scene: nothing to describe")
    return (edit_text(diff(ref, tgt), phrasing, rng, scene=ref),
            edit_text(diff(tgt, ref), phrasing, rng, scene=tgt))


__all__ = ["KINDS", "PHRASINGS", "Edit", "apply_edit", "apply_edits", "diff", "edit_text",
           "modification_texts", "random_edit", "valid_kinds"]
