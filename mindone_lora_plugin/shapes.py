"""The coloured-shapes world of the demo: the palette, a drawing function, and a colour-and-shape scorer.

The scorer reads pixel statistics only (no classifier, nothing downloaded): it separates the figure from the plain
background, names the figure's mean colour after the nearest palette colour, and names its shape after the template
(ellipse, box, upright triangle, plus sign) that best overlaps the figure's mask inside its bounding box.

    >>> from mindone_lora_plugin.shapes import draw, classify
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


def _templates(h: int, w: int) -> dict[str, list[np.ndarray]]:
    """Boolean masks of each shape filling an ``h`` × ``w`` box (a few arm widths for the cross)."""
    y, x = np.mgrid[0:h, 0:w]
    yy, xx = (y + 0.5) / h, (x + 0.5) / w  # 0..1 inside the box
    out = {"circle": [(xx - 0.5) ** 2 + (yy - 0.5) ** 2 <= 0.25], "square": [np.ones((h, w), bool)],
           "triangle": [np.abs(xx - 0.5) <= yy / 2]}
    out["cross"] = [(np.abs(xx - 0.5) <= a) | (np.abs(yy - 0.5) <= a) for a in (0.12, 0.17, 0.22, 0.27)]
    return out


@dataclass
class Reading:
    colour: str | None
    shape: str | None
    iou: float  # overlap with the best shape template
    area: float  # the figure's share of the image


def read(image) -> Reading:
    """Colour and shape of the one figure in ``image`` (PIL image or HWC uint8 array), or None for either."""
    a = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image, dtype=np.float32)
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    bg = np.median(border, axis=0)
    mask = np.abs(a - bg).max(axis=-1) > 60
    area = float(mask.mean())
    if area < 0.03:
        return Reading(None, None, 0.0, area)
    colour_rgb = a[mask].mean(axis=0)
    names = list(PALETTE)
    dist = [float(np.linalg.norm(colour_rgb - np.asarray(PALETTE[n], np.float32))) for n in names]
    colour = names[int(np.argmin(dist))] if min(dist) <= _MAX_COLOUR_DISTANCE else None
    rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    box = mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    best, best_iou = None, 0.0
    for name, masks in _templates(*box.shape).items():
        for t in masks:
            iou = float((t & box).sum() / max(1, (t | box).sum()))
            if iou > best_iou:
                best, best_iou = name, iou
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
