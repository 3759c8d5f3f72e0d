"""The shapes world: scenes of coloured shapes on a 3x3 grid, their images and captions.

This is the embedded default dataset (DESIGN.md, "The embedded default"). It exists so
that the whole pipeline (mining, text generation, training, retrieval, evaluation) can
run on a laptop with *exact* ground truth: every image has a caption that says
everything about it, and `parse_caption` turns that caption back into the scene, so any
later stage can recover the scene from the corpus table alone, without side files.

A scene is a set of objects, at most one per grid cell. Because cells are unique the
cell identifies an object, and sorting by cell gives every scene one canonical form:
equal scenes compare and hash equal, and captions are canonical strings.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
SIZES = ("small", "large")
# Row-major order; this order is the canonical object order in scenes and captions.
CELLS = (
    "top left", "top", "top right",
    "left", "centre", "right",
    "bottom left", "bottom", "bottom right",
)
MAX_OBJECTS = len(CELLS)

# The one preposition each cell takes in captions and synthetic texts ("at the top left",
# "on the left", "in the centre"): fixed, so captions stay exact and parseable.
PREPOSITIONS = {
    "top left": "at", "top": "at", "top right": "at",
    "left": "on", "centre": "in", "right": "on",
    "bottom left": "at", "bottom": "at", "bottom right": "at",
}

# Clearly distinct hues on a light background (yellow and orange are darkened enough to
# stand out against near-white).
RGB = {
    "red": (214, 39, 40),
    "green": (44, 160, 44),
    "blue": (31, 90, 220),
    "yellow": (222, 184, 0),
    "purple": (128, 60, 170),
    "orange": (245, 125, 0),
}
SIZE_FRACTION = {"small": 0.45, "large": 0.85}  # of a cell's side
_SUPERSAMPLE = 3  # draw larger and downsample: small shapes stay recognisable
_BACKGROUND = (238, 238, 232)

_CELL_INDEX = {c: i for i, c in enumerate(CELLS)}


@dataclass(frozen=True)
class Obj:
    """One object: what it looks like and in which cell it sits."""

    shape: str
    colour: str
    size: str
    cell: str

    def __post_init__(self):
        for name, value, allowed in (
            ("shape", self.shape, SHAPES),
            ("colour", self.colour, COLOURS),
            ("size", self.size, SIZES),
            ("cell", self.cell, CELLS),
        ):
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; expected one of {allowed}")

    @property
    def look(self) -> tuple[str, str, str]:
        """(shape, colour, size): everything but the position; moves keep it."""
        return (self.shape, self.colour, self.size)

    def replace(self, **changes) -> "Obj":
        """A copy with some fields changed (validated like any new object)."""
        fields = {"shape": self.shape, "colour": self.colour, "size": self.size, "cell": self.cell}
        fields.update(changes)
        return Obj(**fields)


@dataclass(frozen=True)
class Scene:
    """A non-empty set of objects, at most one per cell, kept sorted by cell.

    Sorting in `__post_init__` makes the dataclass's generated `==` and `hash` mean
    "same scene" whatever order the objects were given in.
    """

    objects: tuple[Obj, ...]

    def __post_init__(self):
        objs = tuple(sorted(self.objects, key=lambda o: _CELL_INDEX[o.cell]))
        if not objs:
            raise ValueError("a scene needs at least one object")
        if not all(isinstance(o, Obj) for o in objs):
            raise TypeError("scene objects must be Obj instances")
        cells = [o.cell for o in objs]
        if len(set(cells)) != len(cells):
            raise ValueError(f"two objects in one cell: {cells}")
        object.__setattr__(self, "objects", objs)

    def at(self, cell: str) -> Obj | None:
        """The object in `cell`, or None if the cell is empty."""
        for o in self.objects:
            if o.cell == cell:
                return o
        return None

    def empty_cells(self) -> list[str]:
        """Free cells in canonical order."""
        used = {o.cell for o in self.objects}
        return [c for c in CELLS if c not in used]


# ---------------------------------------------------------------------------- text

def describe(obj: Obj) -> str:
    """'small red circle': the look of an object, in the fixed size-colour-shape order."""
    return f"{obj.size} {obj.colour} {obj.shape}"


def locative(cell: str) -> str:
    """'at the top left', 'on the left', 'in the centre'."""
    return f"{PREPOSITIONS[cell]} the {cell}"


def caption(scene: Scene) -> str:
    """The exact, canonical caption: objects in cell order, joined by ', '."""
    return ", ".join(f"a {describe(o)} {locative(o.cell)}" for o in scene.objects)


def _alternation(words) -> str:
    # Longest first so that "top left" wins over "top" in the regex alternation.
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


_OBJECT_RE = re.compile(
    rf"a ({_alternation(SIZES)}) ({_alternation(COLOURS)}) ({_alternation(SHAPES)}) "
    rf"(?:at|on|in) the ({_alternation(CELLS)})"
)


def parse_caption(text: str) -> Scene:
    """The scene a caption describes; the exact inverse of `caption`.

    Only canonical captions are accepted (objects in cell order, the right preposition
    per cell): anything `caption` cannot produce raises ValueError, so a caption from
    another dataset is never silently half-parsed.
    """
    if not isinstance(text, str):
        raise ValueError(f"not a shapes caption: {text!r}")
    objects = []
    for part in text.split(", "):
        m = _OBJECT_RE.fullmatch(part)
        if m is None:
            raise ValueError(f"not a shapes caption: {text!r}")
        size, colour, shape, cell = m.groups()
        objects.append(Obj(shape=shape, colour=colour, size=size, cell=cell))
    try:
        scene = Scene(tuple(objects))
    except ValueError as e:
        raise ValueError(f"not a shapes caption: {text!r} ({e})") from None
    if caption(scene) != text:
        raise ValueError(f"not a shapes caption: {text!r} (not in canonical form)")
    return scene


# ------------------------------------------------------------------------ sampling

def random_obj(rng: np.random.Generator, cell: str) -> Obj:
    """A uniformly random look in a given cell."""
    return Obj(
        shape=SHAPES[rng.integers(len(SHAPES))],
        colour=COLOURS[rng.integers(len(COLOURS))],
        size=SIZES[rng.integers(len(SIZES))],
        cell=cell,
    )


def random_scene(rng: np.random.Generator, min_objects: int = 1, max_objects: int = 4) -> Scene:
    """A scene with a uniform number of objects in [min_objects, max_objects], in
    distinct random cells, each with a uniformly random look."""
    if not 1 <= min_objects <= max_objects <= MAX_OBJECTS:
        raise ValueError(
            f"need 1 <= min_objects <= max_objects <= {MAX_OBJECTS}, "
            f"got {min_objects}, {max_objects}"
        )
    n = int(rng.integers(min_objects, max_objects + 1))
    cells = sorted(int(i) for i in rng.choice(len(CELLS), size=n, replace=False))
    return Scene(tuple(random_obj(rng, CELLS[i]) for i in cells))


# ----------------------------------------------------------------------- rendering

def _polygon(shape: str, cx: float, cy: float, extent: float) -> list[tuple[float, float]]:
    """Vertices of a triangle or star that fits an extent x extent box around (cx, cy)."""
    r = extent / 2
    if shape == "triangle":
        h = extent * 0.87  # equilateral-ish, centred vertically in the box
        return [(cx, cy - h / 2), (cx + r, cy + h / 2), (cx - r, cy + h / 2)]
    if shape == "star":  # five points, inner radius 40% of outer, one point straight up
        angles = -np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, r, 0.4 * r)
        cy_star = cy + 0.06 * r  # the star's visual centre sits a bit above its box centre
        return [(cx + q * np.cos(a), cy_star + q * np.sin(a)) for q, a in zip(radii, angles)]
    raise ValueError(f"no polygon for shape {shape!r}")


def render(scene: Scene, image_size: int = 64, seed: int = 0) -> Image.Image:
    """An RGB image of `scene`.

    `seed` adds a little variation that does not change what the caption says (a slight
    background tint, up to 1 px of jitter per object), because real collections are
    never pixel-identical and a model should not be able to match images by exact
    pixels. The same (scene, image_size, seed) always gives the same pixels.
    """
    if image_size < 12:
        raise ValueError(f"image_size must be at least 12 pixels, got {image_size}")
    rng = np.random.default_rng([int(seed), image_size])
    s = _SUPERSAMPLE
    tint = rng.integers(-6, 7, size=3)
    background = tuple(int(c + t) for c, t in zip(_BACKGROUND, tint))
    canvas = Image.new("RGB", (image_size * s, image_size * s), background)
    draw = ImageDraw.Draw(canvas)
    cell_px = image_size * s / 3
    for obj in scene.objects:
        row, col = divmod(_CELL_INDEX[obj.cell], 3)
        jx, jy = rng.integers(-1, 2, size=2) * s
        cx = (col + 0.5) * cell_px + jx
        cy = (row + 0.5) * cell_px + jy
        extent = SIZE_FRACTION[obj.size] * cell_px
        fill = RGB[obj.colour]
        if obj.shape == "circle":
            r = extent / 2
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif obj.shape == "square":
            r = extent * 0.43  # a little smaller than the box: similar area to the circle
            draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
        else:
            draw.polygon(_polygon(obj.shape, cx, cy, extent), fill=fill)
    return canvas.resize((image_size, image_size), Image.Resampling.BOX)
