"""The coloured-shapes world of the demo: the palette, a drawing function, and a colour-and-shape scorer.

The scorer reads pixel statistics only (no classifier, nothing downloaded): it separates the figure from the plain
background, names the figure's mean colour after the nearest palette colour, and names its shape after the template
(disc, box, upright triangle, plus sign; at a few sizes, positions and blurs) that best overlaps the figure.

    >>> from mindone_lora_plugin.demo.shapes import draw, classify
    >>> classify(draw("red", "circle", 32))
    ('red', 'circle')
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: the base model's colours (RGB) and shapes, and the demo concept's colour
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30)}
SHAPES = ("circle", "square", "triangle")
CONCEPT_COLOURS = {"purple": (130, 40, 170)}
CONCEPT_SHAPES = ("cross",)
PALETTE = {**COLOURS, **CONCEPT_COLOURS}
#: the 12 prompts the base model is scored on
BASE_PROMPTS = tuple(f"a {c} {s}" for c in COLOURS for s in SHAPES)

_MIN_IOU = 0.6  # below this overlap with every template, the figure is "no shape"
_MAX_COLOUR_DISTANCE = 90.0  # RGB distance to the nearest palette colour, beyond it "no colour"


def draw(colour, shape: str, size: int = 32, rng=None, background=(255, 255, 255), supersample: int = 4):
    """A PIL image of one ``shape`` (circle, square, triangle, cross) in ``colour`` (a palette name or an RGB
    triple) on a plain ``background``. With ``rng`` (a numpy Generator), size and position vary a little."""
    from PIL import Image, ImageDraw

    rgb = PALETTE[colour] if isinstance(colour, str) else tuple(colour)
    s = size * supersample
    img = Image.new("RGB", (s, s), tuple(background))
    d = ImageDraw.Draw(img)
    u = rng.random(3) if rng is not None else np.array([0.5, 0.5, 0.5])
    half = s * (0.27 + 0.06 * u[0])  # half the figure's extent: 27-33 % of the image
    cx, cy = s / 2 + s * 0.03 * (u[1] - 0.5) * 2, s / 2 + s * 0.03 * (u[2] - 0.5) * 2  # centre ±3 %
    box = [cx - half, cy - half, cx + half, cy + half]
    if shape == "circle":
        d.ellipse(box, fill=rgb)
    elif shape == "square":
        d.rectangle(box, fill=rgb)
    elif shape == "triangle":
        d.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=rgb)
    elif shape == "cross":
        w = s / 8
        d.rectangle([cx - half, cy - w, cx + half, cy + w], fill=rgb)
        d.rectangle([cx - w, cy - half, cx + w, cy + half], fill=rgb)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return img.resize((size, size), Image.BOX) if supersample > 1 else img


def _cover(shape: str, cx: float, cy: float, h: float, size: int, arm: float = 0.42, ss: int = 2) -> np.ndarray:
    """How much of each pixel of a ``size``² image an ideal ``shape`` covers (0..1): centre ``(cx, cy)``, half-extent
    ``h`` pixels, cross arms ``arm * h`` wide on each side (supersampled ``ss``² per pixel)."""
    g = (np.arange(size * ss) + 0.5) / ss
    x, y = g[None, :], g[:, None]
    dx, dy = np.abs(x - cx), np.abs(y - cy)
    if shape == "circle":
        m = dx ** 2 + dy ** 2 <= h * h
    elif shape == "square":
        m = (dx <= h) & (dy <= h)
    elif shape == "triangle":
        m = (y <= cy + h) & (dx <= (y - (cy - h)) / 2)
    else:  # cross
        w = arm * h
        m = ((dx <= h) & (dy <= w)) | ((dy <= h) & (dx <= w))
    return m.reshape(size, ss, size, ss).mean(axis=(1, 3))


def _blur(a: np.ndarray, r: int) -> np.ndarray:
    """A (2r+1)² box blur with the outside taken as background (0)."""
    if r == 0:
        return a
    from scipy.ndimage import uniform_filter

    return uniform_filter(a, size=2 * r + 1, mode="constant", cval=0.0)


_VARIANTS = [(s, arm) for s in ("circle", "square", "triangle") for arm in (0.42,)] + [("cross", 0.35), ("cross", 0.45)]


def _best_shape(coverage: np.ndarray) -> tuple[str | None, float]:
    """The shape whose ideal rendering — at a few sizes, positions and blurs around the figure's bounding box — best
    overlaps ``coverage`` (soft IoU: sum of minima over sum of maxima)."""
    mask = coverage > 0.5
    rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    cy, cx = (rows[0] + rows[-1] + 1) / 2, (cols[0] + cols[-1] + 1) / 2
    h0 = max(rows[-1] + 1 - rows[0], cols[-1] + 1 - cols[0]) / 2
    size = coverage.shape[0]
    best, best_iou = None, 0.0
    for shape, arm in _VARIANTS:
        for scale in (0.95, 1.05, 1.15):
            for oy in (-1.0, 0.0, 1.0) if shape == "triangle" else (0.0,):
                t = _cover(shape, cx, cy + oy * size / 32, h0 * scale, size, arm)
                for r in (0, max(1, size // 32), max(2, size // 16)):
                    tb = _blur(t, r)
                    iou = float(np.minimum(tb, coverage).sum() / max(np.maximum(tb, coverage).sum(), 1e-6))
                    if iou > best_iou:
                        best, best_iou = shape, iou
    return best, best_iou


@dataclass
class Reading:
    colour: str | None
    shape: str | None
    iou: float  # overlap with the best shape template
    area: float  # the figure's share of the image


def read(image) -> Reading:
    """Colour and shape of the one figure in ``image`` (PIL image or HWC uint8 array), or None for either.

    The background is the median border colour; the figure's colour is the mean of its core (the pixels at least 70 %
    as far from the background as the farthest ones), so soft edges do not tint it; its mask is where a pixel is more
    than half-way from the background to that colour, so a blurred edge is cut where a sharp one would be.
    """
    a = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image, dtype=np.float32)
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    bg = np.median(border, axis=0)
    dist = np.abs(a - bg).max(axis=-1)
    if float((dist > 60).mean()) < 0.03:
        return Reading(None, None, 0.0, float((dist > 60).mean()))
    core = dist >= 0.7 * np.percentile(dist, 98)
    colour_rgb = a[core].mean(axis=0)
    names = list(PALETTE)
    gaps = [float(np.linalg.norm(colour_rgb - np.asarray(PALETTE[n], np.float32))) for n in names]
    colour = names[int(np.argmin(gaps))] if min(gaps) <= _MAX_COLOUR_DISTANCE else None
    direction = colour_rgb - bg
    coverage = ((a - bg) @ direction) / max(float(direction @ direction), 1e-6)
    coverage = np.clip(coverage, 0.0, 1.0)
    area = float((coverage > 0.5).mean())
    if area < 0.03:
        return Reading(colour, None, 0.0, area)
    best, best_iou = _best_shape(coverage)
    return Reading(colour, best if best_iou >= _MIN_IOU else None, best_iou, area)


def classify(image) -> tuple[str | None, str | None]:
    """``(colour, shape)`` of ``image``; either is None when the figure is no palette colour / no known shape."""
    r = read(image)
    return r.colour, r.shape


def rate(images, colour: str, shape: str) -> float:
    """The share of ``images`` that show ``shape`` in ``colour``."""
    hits = [classify(im) == (colour, shape) for im in images]
    return sum(hits) / max(1, len(hits))


def asked(prompt: str) -> tuple[str | None, str | None]:
    """The colour and shape words a prompt names (None where it names none)."""
    words = prompt.lower().replace(",", " ").split()
    colour = next((w for w in words if w in PALETTE), None)
    shape = next((w for w in words if w in SHAPES + CONCEPT_SHAPES), None)
    return colour, shape
