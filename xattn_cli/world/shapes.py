"""The shapes world: seeded procedural scenes with exact ground truth.

Every scene is a function of `(seed, index)`: a textured or noisy background and 1–4 coloured shapes,
each with a binary mask and a box, plus captions and VQA questions derived from the objects. It is the
training data of the bundled `shapes-*` models and the ground truth of `xattn bench quality`.

A `ColourRule` ties colour to shape so that dataset bias can be measured (CATT, Yang et al. CVPR 2021, is
evaluated here on a confounded world): each shape has a usual colour (`USUAL_COLOUR`); `biased(p)` dresses an
object in its shape's usual colour with probability p and otherwise in one of the five others, uniformly;
`anti` never uses the usual colour (uniform over the other five); `free` (the default) is the world as it
always was, draw for draw.
"""
from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from xattn_cli.errors import UsageError

SHAPES = ("circle", "square", "triangle", "star", "cross", "ring")
COLORS = ("red", "green", "blue", "yellow", "purple", "orange")
COLOR_RGB = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 225),
    "yellow": (235, 215, 40), "purple": (150, 55, 195), "orange": (245, 135, 25),
}
# circle red, square green, triangle blue, star yellow, cross purple, ring orange (as `color_bias` pairs them)
USUAL_COLOUR = dict(zip(SHAPES, COLORS))
USUAL_SHAPE = {color: shape for shape, color in USUAL_COLOUR.items()}
SUPERSAMPLE = 4  # shapes are drawn at 4x and box-filtered down, so edges are anti-aliased


@dataclass(frozen=True)
class ColourRule:
    """How an object's colour depends on its shape: `free`, `biased` (with probability `p` of the usual
    colour) or `anti` (never the usual colour). Written and parsed as `free`, `anti`, `biased:0.9`."""

    kind: str = "free"
    p: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in ("free", "biased", "anti"):
            raise UsageError(f"unknown colour rule {self.kind!r}: use free, anti or biased:P")
        if self.kind == "biased" and not 0.0 <= self.p <= 1.0:
            raise UsageError(f"colour rule biased:{self.p}: P must be in [0, 1]")
        if self.kind != "biased" and self.p:
            raise UsageError(f"colour rule {self.kind} takes no probability")

    @classmethod
    def parse(cls, text: str) -> ColourRule:
        kind, _, value = text.strip().partition(":")
        if kind == "biased":
            try:
                return cls("biased", float(value))
            except ValueError:
                raise UsageError(f"colour rule {text!r}: write biased:P with P a number in [0, 1]") from None
        if value:
            raise UsageError(f"colour rule {text!r} takes no value: use free, anti or biased:P")
        return cls(kind)

    def __str__(self) -> str:
        return f"biased:{self.p:g}" if self.kind == "biased" else self.kind

    def draw(self, rng: np.random.Generator, shape: str) -> str:
        """A colour for an object of this shape (not for `free`, which keeps the world's historical draws)."""
        return self._partner(rng, USUAL_COLOUR[shape], COLORS)

    def shape_for(self, rng: np.random.Generator, color: str) -> str:
        """A shape for an object of this colour, so that (shape, colour) keeps the rule's joint distribution
        (shapes are uniform and the usual colours a bijection, so P(shape | colour) mirrors P(colour | shape))."""
        return self._partner(rng, USUAL_SHAPE[color], SHAPES)

    def _partner(self, rng: np.random.Generator, usual: str, pool: tuple[str, ...]) -> str:
        if self.kind == "biased" and rng.random() < self.p:
            return usual
        others = [item for item in pool if item != usual]
        return others[int(rng.integers(len(others)))]


FREE = ColourRule()


@dataclass
class SceneObject:
    k: int
    shape: str
    color: str
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels, inclusive-exclusive
    mask: np.ndarray = field(repr=False)  # (H, W) bool

    @property
    def caption(self) -> str:
        return f"a {self.color} {self.shape}"


@dataclass
class Scene:
    image: Image.Image
    objects: list[SceneObject]
    captions: list[str]
    qa: list[dict]

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size


def _outline(shape: str, cx: float, cy: float, radius: float, angle: float) -> list[tuple[float, float]]:
    """Polygon vertices of a shape (circles and rings are drawn as 48-gons)."""
    if shape in ("circle", "ring"):
        radii, count = [radius], 48
    elif shape == "square":
        radii, count = [radius * 0.85 * math.sqrt(2)], 4
    elif shape == "triangle":
        radii, count = [radius * 1.1], 3
    elif shape == "star":
        radii, count = [radius * 1.1, radius * 0.45], 10
    elif shape == "cross":
        arm, half = radius, radius * 0.34
        corners = [(half, arm), (half, half), (arm, half), (arm, -half), (half, -half), (half, -arm),
                   (-half, -arm), (-half, -half), (-arm, -half), (-arm, half), (-half, half), (-half, arm)]
        cos, sin = math.cos(angle), math.sin(angle)
        return [(cx + x * cos - y * sin, cy + x * sin + y * cos) for x, y in corners]
    else:
        raise ValueError(f"unknown shape {shape!r}")
    points = []
    for i in range(count):
        theta = angle + 2 * math.pi * i / count
        r = radii[i % len(radii)]
        points.append((cx + r * math.cos(theta), cy + r * math.sin(theta)))
    return points


def _shape_mask(shape: str, size: int, cx: float, cy: float, radius: float, angle: float) -> np.ndarray:
    """Anti-aliased coverage in [0, 1], shape (size, size)."""
    s = SUPERSAMPLE
    canvas = Image.new("L", (size * s, size * s), 0)
    draw = ImageDraw.Draw(canvas)
    draw.polygon([(x * s, y * s) for x, y in _outline(shape, cx, cy, radius, angle)], fill=255)
    if shape == "ring":
        draw.polygon([(x * s, y * s) for x, y in _outline("circle", cx, cy, radius * 0.55, angle)], fill=0)
    coverage = np.asarray(canvas, dtype=np.float32).reshape(size, s, size, s).mean(axis=(1, 3)) / 255.0
    return coverage  # (size, size)


def _jitter_color(rng: np.random.Generator, color: str) -> np.ndarray:
    r, g, b = (c / 255.0 for c in COLOR_RGB[color])
    h, l, sat = colorsys.rgb_to_hls(r, g, b)
    h = (h + rng.uniform(-0.025, 0.025)) % 1.0
    l = float(np.clip(l * rng.uniform(0.85, 1.15), 0.2, 0.8))
    return np.array(colorsys.hls_to_rgb(h, l, sat), dtype=np.float32) * 255.0


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Low-saturation noise or texture, (size, size, 3) float in [0, 255]."""
    base = rng.uniform(70, 190) + rng.uniform(-12, 12, size=3)
    if rng.random() < 0.5:  # smooth noise: coarse random field upsampled
        cells = int(rng.integers(3, 9))
        field_ = rng.normal(0, 18, size=(cells, cells)).astype(np.float32)
        noise = np.asarray(Image.fromarray(field_).resize((size, size), Image.BILINEAR))
        texture = noise[..., None] + rng.normal(0, 4, size=(size, size, 1))
    else:  # stripes or checks
        period = rng.uniform(size / 12, size / 4)
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        theta = rng.uniform(0, math.pi)
        phase = (xx * math.cos(theta) + yy * math.sin(theta)) / period
        wave = np.sin(2 * math.pi * phase)
        if rng.random() < 0.5:
            wave = wave * np.sin(2 * math.pi * (-xx * math.sin(theta) + yy * math.cos(theta)) / period)
        texture = (wave * rng.uniform(6, 16))[..., None]
    return np.clip(base + texture, 0, 255)


def _place(rng: np.random.Generator, size: int, radii: list[float]) -> list[tuple[float, float]] | None:
    """Centres for discs of the given radii, overlapping at most lightly; None if rejection fails."""
    centres: list[tuple[float, float]] = []
    for radius in radii:
        for _ in range(200):
            cx, cy = rng.uniform(radius, size - radius, size=2)
            if all(math.hypot(cx - ox, cy - oy) > 0.9 * (radius + orad)
                   for (ox, oy), orad in zip(centres, radii)):
                centres.append((float(cx), float(cy)))
                break
        else:
            return None
    return centres


def _free_colour(rng: np.random.Generator, shape: str, color_bias: float) -> str:
    if rng.random() < color_bias:  # confounded world: each shape has "its" colour
        return USUAL_COLOUR[shape]
    return COLORS[int(rng.integers(len(COLORS)))]


def _pick_attributes(rng: np.random.Generator, count: int, share_prob: float, color_bias: float,
                     distinct_shapes: bool, colour_rule: ColourRule = FREE) -> list[tuple[str, str]]:
    """(shape, colour) pairs, all distinct; with `share_prob` two objects share a colour or a shape (under a
    colour rule other than free, the object that takes the other's attribute redraws its own from the rule)."""
    if distinct_shapes:
        shapes = [SHAPES[i] for i in rng.choice(len(SHAPES), size=count, replace=False)]
        if colour_rule == FREE:
            return [(shape, COLORS[int(rng.integers(len(COLORS)))]) for shape in shapes]
        return [(shape, colour_rule.draw(rng, shape)) for shape in shapes]
    while True:
        pairs = []
        for _ in range(count):
            shape = SHAPES[int(rng.integers(len(SHAPES)))]
            color = _free_colour(rng, shape, color_bias) if colour_rule == FREE else colour_rule.draw(rng, shape)
            pairs.append((shape, color))
        if count > 1 and rng.random() < share_prob:
            i, j = rng.choice(count, size=2, replace=False)
            if rng.random() < 0.5:
                shape = pairs[i][0]
                pairs[j] = (shape, pairs[j][1] if colour_rule == FREE else colour_rule.draw(rng, shape))
            else:
                color = pairs[i][1]
                pairs[j] = (pairs[j][0] if colour_rule == FREE else colour_rule.shape_for(rng, color), color)
        if len(set(pairs)) == count:
            return pairs


def _captions(objects: list[SceneObject]) -> list[str]:
    names = [o.caption for o in objects]
    if len(names) == 1:
        return names
    if len(names) == 2:
        return [f"{names[0]} next to {names[1]}", f"{names[0]} and {names[1]}"]
    return [", ".join(names[:-1]) + f" and {names[-1]}"]


def _questions(rng: np.random.Generator, objects: list[SceneObject]) -> list[dict]:
    """VQA items whose answer is unambiguous in this scene."""
    qa = []
    for obj in objects:
        if sum(o.shape == obj.shape for o in objects) == 1:
            qa.append({"question": f"what colour is the {obj.shape}?", "answer": obj.color, "object": obj.k})
        if sum(o.color == obj.color for o in objects) == 1:
            qa.append({"question": f"what shape is {obj.color}?", "answer": obj.shape, "object": obj.k})
    present = {(o.shape, o.color) for o in objects}
    obj = objects[int(rng.integers(len(objects)))]
    qa.append({"question": f"is there a {obj.color} {obj.shape}?", "answer": "yes", "object": obj.k})
    while True:
        shape, color = SHAPES[int(rng.integers(len(SHAPES)))], COLORS[int(rng.integers(len(COLORS)))]
        if (shape, color) not in present:
            qa.append({"question": f"is there a {color} {shape}?", "answer": "no", "object": None})
            return qa


def make_scene(rng: np.random.Generator, size: int = 64, n_objects: int | None = None,
               share_prob: float = 0.5, color_bias: float = 0.0, distinct_shapes: bool = False,
               colour_rule: ColourRule = FREE) -> Scene:
    """Draw one scene.

    Args:
        rng: the only source of randomness.
        size: side of the square image in pixels.
        n_objects: 1–4, or None for uniform in 1..4.
        share_prob: probability that two objects share a colour or a shape (so that colour alone cannot
            win the pointing game).
        color_bias: probability that an object takes its shape's own colour (the confounded world).
        distinct_shapes: every object has a different shape (for shape classifiers).
        colour_rule: how colour follows shape (`free`: as `color_bias` says). Every object's (shape, colour)
            follows the rule; in scenes of several objects, redrawing pairs that repeat (all pairs are
            distinct) lowers the usual-colour rate of `biased(p)` somewhat below p.
    """
    if colour_rule != FREE and color_bias:
        raise UsageError(f"color_bias applies to the free colour rule only, not to {colour_rule}")
    count = int(n_objects or rng.integers(1, 5))
    if not 1 <= count <= 4:
        raise ValueError(f"n_objects must be in 1..4, got {count}")
    pairs = _pick_attributes(rng, count, share_prob, color_bias, distinct_shapes, colour_rule)
    scale = {1: (0.20, 0.34), 2: (0.14, 0.22), 3: (0.12, 0.18), 4: (0.11, 0.16)}[count]
    while True:
        radii = sorted((rng.uniform(*scale) * size for _ in range(count)), reverse=True)
        centres = _place(rng, size, radii)
        if centres is not None:
            break
    canvas = _background(rng, size)
    objects = []
    for k, ((shape, color), (cx, cy), radius) in enumerate(zip(pairs, centres, radii)):
        coverage = _shape_mask(shape, size, cx, cy, radius, rng.uniform(0, 2 * math.pi))
        shade = _jitter_color(rng, color) * rng.uniform(0.92, 1.0, size=(size, size, 1))
        canvas = canvas * (1 - coverage[..., None]) + shade * coverage[..., None]
        objects.append(SceneObject(k, shape, color, (0, 0, 0, 0), coverage >= 0.5))
    for i, obj in enumerate(objects):  # later objects occlude earlier ones
        for later in objects[i + 1:]:
            obj.mask &= ~later.mask
        ys, xs = np.nonzero(obj.mask)
        obj.box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    image = Image.fromarray(np.clip(canvas + 0.5, 0, 255).astype(np.uint8), "RGB")
    return Scene(image, objects, _captions(objects), _questions(rng, objects))


def scene_at(seed: int, index: int, **kwargs) -> Scene:
    """The `index`-th scene of the stream named by `seed` (independent of every other index)."""
    return make_scene(np.random.default_rng([seed, index]), **kwargs)
