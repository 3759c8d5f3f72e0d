"""The exact checker of shapes texts (cir.data.edit_parse): hand-written texts of both
phrasing families, ambiguity, and every text the two families generate."""
import numpy as np
import pytest

from cir.data.edit_parse import caption_is_exact, readings, text_is_exact
from cir.data.edits import apply_edit, diff, edit_text, random_edit
from cir.data.shapes import Obj, Scene, caption, random_scene

RED = Obj("circle", "red", "small", "top left")
BLUE = Obj("square", "blue", "large", "centre")
RED2 = Obj("circle", "red", "large", "bottom right")
REF = Scene((RED, BLUE))


def scene(*objs):
    return Scene(tuple(objs))


CASES = [  # (text, target scene) on REF, each exact
    ("make the small red circle at the top left blue", scene(RED.replace(colour="blue"), BLUE)),
    ("change the large blue square in the centre into a star", scene(RED, BLUE.replace(shape="star"))),
    ("make the large blue square in the centre small", scene(RED, BLUE.replace(size="small"))),
    ("add a small green triangle on the left", scene(RED, BLUE, Obj("triangle", "green", "small", "left"))),
    ("remove the small red circle at the top left", scene(BLUE)),
    ("move the large blue square from the centre to the bottom", scene(RED, BLUE.replace(cell="bottom"))),
    ("make the small red circle at the top left blue and remove the large blue square in the centre",
     scene(RED.replace(colour="blue"))),
    ("make the small red circle at the top left large, add a small green star at the top "
     "and remove the large blue square in the centre",
     scene(RED.replace(size="large"), Obj("star", "green", "small", "top"))),
    # human phrasing: synonyms, shortened references, other joiners
    ("paint the red one orange", scene(RED.replace(colour="orange"), BLUE)),
    ("the big blue square should be a circle instead", scene(RED, BLUE.replace(shape="circle"))),
    ("replace the square with a triangle of the same colour and size", scene(RED, BLUE.replace(shape="triangle"))),
    ("I want a star where the tiny circle in the top-left corner is", scene(RED.replace(shape="star"), BLUE)),
    ("shrink the square in the middle", scene(RED, BLUE.replace(size="small"))),
    ("the little red circle should be bigger", scene(RED.replace(size="large"), BLUE)),
    ("get rid of the blue shape", scene(RED)),
    ("same picture but the circle is purple; also take away the big square in the very middle",
     scene(RED.replace(colour="purple"))),
    ("shift the big blue square over to the bottom-right corner", scene(RED, BLUE.replace(cell="bottom right"))),
    ("put the circle at the bottom in the middle", scene(RED.replace(cell="bottom"), BLUE)),
    ("same but with an extra large yellow star bottom left", scene(RED, BLUE, Obj("star", "yellow", "large", "bottom left"))),
    ("Paint the red one orange, then delete the square.", scene(RED.replace(colour="orange"))),
]


@pytest.mark.parametrize("text,target", CASES)
def test_hand_written_texts_are_exact(text, target):
    assert text_is_exact(text, REF, target), readings(text, REF)


@pytest.mark.parametrize("text", [
    "make the small red circle at the top left red",        # changes nothing
    "remove the green triangle",                            # no such object
    "paint the circle on the left blue",                    # the circle is at the top left
    "make it blue",                                         # names no object
    "add a small red star in the centre",                   # the centre is taken
    "move the small red circle from the top left to the centre",  # taken
    "the circle should be",                                 # unfinished
])
def test_texts_that_fit_nothing(text):
    assert readings(text, REF) == set()


def test_an_ambiguous_text_is_wrong():
    two_red = scene(RED, BLUE, RED2)
    target = scene(RED.replace(colour="green"), BLUE, RED2)
    assert not text_is_exact("paint the red circle green", two_red, target)  # which one?
    assert readings("paint the red circle green", two_red) == set()  # names two objects
    assert text_is_exact("paint the small red circle green", two_red, target)


def test_wrong_value_is_wrong():
    assert not text_is_exact("paint the red one green", REF, scene(RED.replace(colour="orange"), BLUE))


@pytest.mark.parametrize("phrasing", ["synthetic", "human"])
def test_every_generated_text_is_exact(phrasing):
    rng = np.random.default_rng(7)
    checked = 0
    while checked < 300:
        ref, tgt = random_scene(rng, 1, 4), None
        tgt = ref
        for _ in range(int(rng.integers(1, 5))):
            tgt = apply_edit(tgt, random_edit(rng, tgt))
        if tgt == ref:
            continue
        text = edit_text(diff(ref, tgt), phrasing, rng, scene=ref)
        assert text_is_exact(text, ref, tgt), text
        other = apply_edit(tgt, random_edit(rng, tgt))
        assert not text_is_exact(text, ref, other), text
        checked += 1


def test_captions():
    assert caption_is_exact(caption(REF), REF)
    assert caption_is_exact(caption(REF) + " ", REF)
    assert not caption_is_exact("a small red circle at the top left", REF)
    assert not caption_is_exact("a red circle", REF)
