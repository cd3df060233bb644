"""The shapes world: seeded procedural scenes with exact ground truth.

Every scene is a function of `(seed, index)`: a textured or noisy background and 1–4 coloured shapes,
each with a binary mask and a box, plus captions and VQA questions derived from the objects. It is the
training data of the bundled `shapes-*` models and the ground truth of `xattn bench quality`.

A `ColourRule` ties colour to shape so that dataset bias can be measured (CATT, Yang et al. CVPR 2021, is
evaluated here on a confounded world): each shape has a usual colour (`USUAL_COLOUR`); `biased(p)` dresses an
object in its shape's usual colour with probability p and otherwise in one of the five others, uniformly;
`anti` never uses the usual colour (uniform over the other five); `free` (the default) is the world as it
always was, draw for draw.

A style picks the renderer; the vocabulary and the ground truth are the same in every style:
- `classic` (the default): the original renderer, pixel for pixel.
- `varied`: the training world that keeps models off renderer details: rotation, scale and aspect jitter,
  proportion variants (cross arm width, star inner radius, ring hole), colour jitter inside each name's hue
  window, five background families, overlaps that leave at least `MIN_VISIBLE` of every object in view,
  optional outlines and aliased or anti-aliased edges.
- `shifted`: a renderer whose choices differ from `varied`'s (other proportions, sizes, backgrounds, outlines
  and edges). It is for model selection and model cards only, never for training.
Under every style an object's mask is the pixels where that object makes up more than half of the final
colour (occluded and clipped parts excluded; the classic renderer: coverage >= 0.5 minus later objects), and
its box is the mask's bounding box.
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
# cross half arm width, star inner radius and ring hole, relative to the radius, in the classic renderer
CLASSIC_THICKNESS = {"cross": 0.34, "star": 0.45, "ring": 0.55}
MIN_VISIBLE = 0.6  # styled scenes: every object keeps at least this share of its own mask in view
HUE_JITTER = 0.025  # styled colours stay within +-this of their name's hue; the nearest two names are 0.067 apart
STYLE_NAMES = ("classic", "varied", "shifted")


@dataclass(frozen=True)
class Style:
    """The ranges a styled renderer draws each scene from (`classic` is the original renderer, not a Style)."""

    scale: dict[int, tuple[float, float]]  # object radius / image side, by object count
    size_skew: float  # radius = lo + (hi - lo) * u ** size_skew, u uniform: > 1 favours small objects
    aspect: tuple[float, float]  # an object's width / height before rotation, log-uniform
    thickness: dict[str, tuple[float, float]]  # ranges of the CLASSIC_THICKNESS proportions
    backgrounds: tuple[str, ...]  # families, one per scene
    spacing: float  # centres at least spacing * (r_i + r_j) apart: below 1 objects may overlap
    supersample: tuple[int, ...]  # one per scene: 1 draws aliased edges
    outline: float  # probability that an object has an outline
    outline_tone: float  # outline colour = fill colour * tone
    outline_width: float  # pixels


STYLES = {
    "varied": Style(scale={1: (0.16, 0.38), 2: (0.12, 0.26), 3: (0.10, 0.21), 4: (0.09, 0.18)}, size_skew=1.0,
                    aspect=(0.75, 1.33), thickness={"cross": (0.22, 0.42), "star": (0.36, 0.6), "ring": (0.4, 0.66)},
                    backgrounds=("flat", "gradient", "noise", "stripes", "texture"), spacing=0.45,
                    supersample=(1, 4), outline=0.3, outline_tone=0.45, outline_width=1.0),
    "shifted": Style(scale={1: (0.15, 0.40), 2: (0.11, 0.27), 3: (0.10, 0.22), 4: (0.09, 0.19)}, size_skew=2.0,
                     aspect=(0.68, 1.47), thickness={"cross": (0.42, 0.48), "star": (0.28, 0.36), "ring": (0.66, 0.74)},
                     backgrounds=("checker", "radial", "blotches"), spacing=0.6,
                     supersample=(2,), outline=0.5, outline_tone=0.15, outline_width=1.5),
}


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


def check_style(style: str) -> None:
    if style not in STYLE_NAMES:
        raise UsageError(f"unknown style {style!r}: use {', '.join(STYLE_NAMES)}")


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


def _outline(shape: str, cx: float, cy: float, radius: float, angle: float,
             thickness: float | None = None) -> list[tuple[float, float]]:
    """Polygon vertices of a shape (circles and rings are drawn as 48-gons); `thickness`: the cross's half arm
    width or the star's inner radius relative to `radius` (None: the classic one)."""
    thickness = CLASSIC_THICKNESS.get(shape) if thickness is None else thickness
    if shape in ("circle", "ring"):
        radii, count = [radius], 48
    elif shape == "square":
        radii, count = [radius * 0.85 * math.sqrt(2)], 4
    elif shape == "triangle":
        radii, count = [radius * 1.1], 3
    elif shape == "star":
        radii, count = [radius * 1.1, radius * thickness], 10
    elif shape == "cross":
        arm, half = radius, radius * thickness
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


def _polygons(shape: str, cx: float, cy: float, radius: float, angle: float,
              thickness: float | None = None) -> list[list[tuple[float, float]]]:
    """The shape's outline and, for a ring, the hole cut out of it (`thickness`: as `_outline` takes it, or the
    ring's hole radius relative to `radius`; None: the classic one)."""
    thickness = CLASSIC_THICKNESS.get(shape) if thickness is None else thickness
    polygons = [_outline(shape, cx, cy, radius, angle, thickness)]
    if shape == "ring":
        polygons.append(_outline("circle", cx, cy, radius * thickness, angle))
    return polygons


def _shape_mask(shape: str, size: int, cx: float, cy: float, radius: float, angle: float) -> np.ndarray:
    """Anti-aliased coverage in [0, 1], shape (size, size) (the classic renderer)."""
    return _rasterise(_polygons(shape, cx, cy, radius, angle), size, SUPERSAMPLE)


def _rasterise(polygons: list[list[tuple[float, float]]], size: int, supersample: int,
               stroke: float = 0.0) -> np.ndarray:
    """Coverage in [0, 1], shape (size, size): the first polygon filled and the others cut out of it, or with
    `stroke` > 0 the edges of all of them drawn `stroke` pixels wide; drawn at `supersample`x and box-filtered."""
    s = supersample
    canvas = Image.new("L", (size * s, size * s), 0)
    draw = ImageDraw.Draw(canvas)
    for i, polygon in enumerate(polygons):
        points = [(x * s, y * s) for x, y in polygon]
        if stroke:
            draw.line(points + points[:1], fill=255, width=max(1, round(stroke * s)), joint="curve")
        else:
            draw.polygon(points, fill=0 if i else 255)
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


def _styled_background(rng: np.random.Generator, size: int, pattern: str) -> np.ndarray:
    """A low-saturation background of one pattern (a background family), (size, size, 3) float in [0, 255]."""
    base = rng.uniform(60, 200) + rng.uniform(-12, 12, size=3)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size  # (size, size) each, in [0, 1)
    theta = rng.uniform(0, 2 * math.pi)
    along = xx * math.cos(theta) + yy * math.sin(theta)  # (size, size)
    across = yy * math.cos(theta) - xx * math.sin(theta)  # (size, size)
    if pattern == "flat":
        texture = rng.normal(0, 2, size=(size, size, 1))
    elif pattern == "gradient":
        texture = ((along - along.mean()) * rng.uniform(40, 90))[..., None]
    elif pattern == "noise":
        texture = (_smooth_noise(rng, size, int(rng.integers(3, 9))) * 18 + rng.normal(0, 4, size=(size, size)))[..., None]
    elif pattern == "stripes":
        texture = (np.sin(2 * math.pi * along * rng.uniform(3, 12)) * rng.uniform(6, 16))[..., None]
    elif pattern == "texture":  # photo-like: smooth noise at four scales, a little colour in each channel
        texture = sum(_smooth_noise(rng, size, cells, channels=3) * 16 / 1.6 ** octave
                      for octave, cells in enumerate((3, 6, 12, 24)))
    elif pattern == "checker":
        period = rng.uniform(3, 10)
        texture = (np.sign(np.sin(2 * math.pi * along * period) * np.sin(2 * math.pi * across * period))
                   * rng.uniform(6, 18))[..., None]
    elif pattern == "radial":
        cx, cy = rng.uniform(0, 1, size=2)
        distance = np.hypot(xx - cx, yy - cy)  # (size, size)
        texture = ((distance - distance.mean()) * rng.uniform(-90, 90))[..., None]
    elif pattern == "blotches":  # two tones in soft-edged patches
        tone = 1 / (1 + np.exp(-4 * _smooth_noise(rng, size, int(rng.integers(3, 7)))))  # (size, size)
        texture = (tone - 0.5)[..., None] * (rng.uniform(30, 60) + rng.uniform(-10, 10, size=3))
    else:
        raise ValueError(f"unknown background pattern {pattern!r}")
    return np.clip(base + texture, 0, 255)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int, channels: int | None = None) -> np.ndarray:
    """Unit normal noise on a cells x cells grid, bilinearly upsampled: (size, size) or (size, size, channels)."""
    if channels is not None:
        return np.stack([_smooth_noise(rng, size, cells) for _ in range(channels)], axis=-1)
    field_ = rng.normal(0, 1, size=(cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(field_).resize((size, size), Image.BILINEAR))


def _place(rng: np.random.Generator, size: int, radii: list[float],
           spacing: float = 0.9) -> list[tuple[float, float]] | None:
    """Centres for discs of the given radii, at least `spacing` * (r_i + r_j) apart (0.9: overlapping at most
    lightly); None if rejection fails."""
    centres: list[tuple[float, float]] = []
    for radius in radii:
        for _ in range(200):
            cx, cy = rng.uniform(radius, size - radius, size=2)
            if all(math.hypot(cx - ox, cy - oy) > spacing * (radius + orad)
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
               colour_rule: ColourRule = FREE, style: str = "classic") -> Scene:
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
        style: the renderer, `classic`, `varied` or `shifted` (see the module docstring).
    """
    check_style(style)
    if colour_rule != FREE and color_bias:
        raise UsageError(f"color_bias applies to the free colour rule only, not to {colour_rule}")
    count = int(n_objects or rng.integers(1, 5))
    if not 1 <= count <= 4:
        raise ValueError(f"n_objects must be in 1..4, got {count}")
    pairs = _pick_attributes(rng, count, share_prob, color_bias, distinct_shapes, colour_rule)
    if style == "classic":
        canvas, masks = _render_classic(rng, size, pairs)
    else:
        canvas, masks = _render_styled(rng, size, pairs, STYLES[style])
    objects = []
    for k, ((shape, color), mask) in enumerate(zip(pairs, masks)):
        ys, xs = np.nonzero(mask)
        objects.append(SceneObject(k, shape, color, (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1),
                                   mask))
    image = Image.fromarray(np.clip(canvas + 0.5, 0, 255).astype(np.uint8), "RGB")
    return Scene(image, objects, _captions(objects), _questions(rng, objects))


def _render_classic(rng: np.random.Generator, size: int,
                    pairs: list[tuple[str, str]]) -> tuple[np.ndarray, list[np.ndarray]]:
    """The original renderer: the canvas, (size, size, 3) float, and each object's visible mask."""
    count = len(pairs)
    scale = {1: (0.20, 0.34), 2: (0.14, 0.22), 3: (0.12, 0.18), 4: (0.11, 0.16)}[count]
    while True:
        radii = sorted((rng.uniform(*scale) * size for _ in range(count)), reverse=True)
        centres = _place(rng, size, radii)
        if centres is not None:
            break
    canvas = _background(rng, size)
    masks = []
    for (shape, color), (cx, cy), radius in zip(pairs, centres, radii):
        coverage = _shape_mask(shape, size, cx, cy, radius, rng.uniform(0, 2 * math.pi))
        shade = _jitter_color(rng, color) * rng.uniform(0.92, 1.0, size=(size, size, 1))
        canvas = canvas * (1 - coverage[..., None]) + shade * coverage[..., None]
        masks.append(coverage >= 0.5)
    for i, mask in enumerate(masks):  # later objects occlude earlier ones
        for later in masks[i + 1:]:
            mask &= ~later
    return canvas, masks


def _render_styled(rng: np.random.Generator, size: int, pairs: list[tuple[str, str]],
                   style: Style) -> tuple[np.ndarray, list[np.ndarray]]:
    """A `varied` or `shifted` scene: the canvas, (size, size, 3) float, and each object's visible mask. The
    geometry is redrawn until every object keeps `MIN_VISIBLE` of its mask in view."""
    supersample = style.supersample[int(rng.integers(len(style.supersample)))]
    canvas = _styled_background(rng, size, style.backgrounds[int(rng.integers(len(style.backgrounds)))])
    lo, hi = style.scale[len(pairs)]
    while True:
        radii = sorted(((lo + (hi - lo) * rng.random() ** style.size_skew) * size for _ in pairs), reverse=True)
        centres = _place(rng, size, radii, style.spacing)
        if centres is None:
            continue
        layers = [_styled_layer(rng, style, shape, color, size, centre, radius, supersample)
                  for (shape, color), centre, radius in zip(pairs, centres, radii)]
        coverages = [coverage for coverage, _ in layers]
        masks = _visible_masks(coverages)
        if all(mask.sum() >= MIN_VISIBLE * (coverage > 0.5).sum() and mask.any()
               for mask, coverage in zip(masks, coverages)):
            break
    for coverage, colour in layers:  # later objects are drawn over earlier ones
        canvas = canvas * (1 - coverage[..., None]) + colour * coverage[..., None]
    return canvas, masks


def _visible_masks(coverages: list[np.ndarray]) -> list[np.ndarray]:
    """Where each layer makes up more than half of the final colour, with later layers drawn on top."""
    masks, above = [], np.ones_like(coverages[0])
    for coverage in reversed(coverages):
        masks.append(coverage * above > 0.5)
        above = above * (1 - coverage)
    return masks[::-1]


def _styled_layer(rng: np.random.Generator, style: Style, shape: str, color: str, size: int,
                  centre: tuple[float, float], radius: float, supersample: int) -> tuple[np.ndarray, np.ndarray]:
    """One object's coverage, (size, size) in [0, 1], and colour, (size, size, 3) float."""
    thickness = rng.uniform(*style.thickness[shape]) if shape in style.thickness else None
    aspect = math.exp(rng.uniform(*np.log(style.aspect)))
    angle = rng.uniform(0, 2 * math.pi)
    polygons = [_pose(polygon, centre, angle, aspect) for polygon in _polygons(shape, 0.0, 0.0, radius, 0.0, thickness)]
    coverage = _rasterise(polygons, size, supersample)
    fill = _styled_colour(rng, color)
    colour = fill * rng.uniform(0.88, 1.0, size=(size, size, 1))
    if rng.random() < style.outline:
        stroke = _rasterise(polygons, size, supersample, style.outline_width)[..., None]
        colour = colour * (1 - stroke) + fill * style.outline_tone * stroke
        coverage = np.maximum(coverage, stroke[..., 0])
    return coverage, colour


def _pose(polygon: list[tuple[float, float]], centre: tuple[float, float], angle: float,
          aspect: float) -> list[tuple[float, float]]:
    """A polygon drawn around the origin, stretched to width / height `aspect`, rotated and moved to `centre`."""
    sx, sy = math.sqrt(aspect), 1 / math.sqrt(aspect)
    cos, sin = math.cos(angle), math.sin(angle)
    return [(centre[0] + x * sx * cos - y * sy * sin, centre[1] + x * sx * sin + y * sy * cos) for x, y in polygon]


def _styled_colour(rng: np.random.Generator, color: str) -> np.ndarray:
    """The name's colour with its hue within +-HUE_JITTER, lightness x[0.8, 1.2] and saturation x[0.8, 1]."""
    h, l, sat = colorsys.rgb_to_hls(*(c / 255.0 for c in COLOR_RGB[color]))
    h = (h + rng.uniform(-HUE_JITTER, HUE_JITTER)) % 1.0
    l = float(np.clip(l * rng.uniform(0.8, 1.2), 0.2, 0.8))
    return np.array(colorsys.hls_to_rgb(h, l, sat * rng.uniform(0.8, 1.0)), dtype=np.float32) * 255.0


def scene_at(seed: int, index: int, **kwargs) -> Scene:
    """The `index`-th scene of the stream named by `seed` (independent of every other index)."""
    return make_scene(np.random.default_rng([seed, index]), **kwargs)
