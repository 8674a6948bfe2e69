"""Pictures a person looks at: image grids with a caption line, and the loss curve, as PNG (Pillow only)."""

from __future__ import annotations

import math
import os

import numpy as np


def save_grid(images, path: str, title: str = "", metadata: dict | None = None, cell: int = 128) -> str:
    """Tile PIL images (scaled to ``cell`` pixels) into one PNG with ``title`` written above; return ``path``."""
    from PIL import Image, ImageDraw, PngImagePlugin

    n = max(1, len(images))
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    top = 16 if title else 0
    grid = Image.new("RGB", (cols * cell, rows * cell + top), "white")
    for i, im in enumerate(images):
        grid.paste(im.convert("RGB").resize((cell, cell), Image.NEAREST), ((i % cols) * cell, top + (i // cols) * cell))
    if title:
        ImageDraw.Draw(grid).text((3, 2), title[: cols * cell // 6], fill="black")
    info = PngImagePlugin.PngInfo()
    for k, v in (metadata or {}).items():
        info.add_text(str(k), str(v))
    _save_png(grid, path, info)
    return path


def save_rows(rows, path: str, title: str = "", cell: int = 64, label_width: int = 150,
              metadata: dict | None = None) -> str:
    """One PNG with a labelled row of images per ``(label, images)`` in ``rows``; ``title`` above; return ``path``."""
    from PIL import Image, ImageDraw, PngImagePlugin

    cols = max(1, max(len(ims) for _, ims in rows))
    top = 16 if title else 0
    grid = Image.new("RGB", (label_width + cols * cell, top + len(rows) * cell), "white")
    d = ImageDraw.Draw(grid)
    if title:
        d.text((3, 2), title[: (label_width + cols * cell) // 6], fill="black")
    for r, (label, ims) in enumerate(rows):
        y = top + r * cell
        for i, line in enumerate(str(label).split("\n")[:4]):
            d.text((3, y + 4 + 12 * i), line[: label_width // 6], fill="black")
        for c, im in enumerate(ims):
            grid.paste(im.convert("RGB").resize((cell, cell), Image.NEAREST), (label_width + c * cell, y))
    info = PngImagePlugin.PngInfo()
    for k, v in (metadata or {}).items():
        info.add_text(str(k), str(v))
    _save_png(grid, path, info)
    return path


def save_loss_curve(losses: list[float], path: str, title: str = "training loss", validation=None) -> str:
    """Plot per-step losses (thin grey), their moving average (blue) and ``validation`` ``(step, loss)`` points
    (orange, joined) as a PNG."""
    from PIL import Image, ImageDraw

    w, h, pad = 640, 360, 40
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    d.rectangle([pad, pad // 2, w - pad // 2, h - pad], outline="black")
    d.text((pad, 4), title, fill="black")
    values = np.asarray([v for v in losses if np.isfinite(v)], dtype=np.float64)
    val = [(int(s), float(v)) for s, v in (validation or []) if np.isfinite(v)]
    if len(values):
        both = np.concatenate([values, [v for _, v in val]])
        lo, hi = float(both.min()), float(both.max())
        hi = hi if hi > lo else lo + 1e-8
        span_x = max(1, len(values) - 1)

        def xy(i, v):
            return (pad + (w - 1.5 * pad) * i / span_x, h - pad - (h - 1.5 * pad) * (v - lo) / (hi - lo))

        d.line([xy(i, v) for i, v in enumerate(values)], fill=(170, 170, 170), width=1)
        k = max(1, len(values) // 20)
        smooth = np.convolve(values, np.ones(k) / k, mode="valid")
        d.line([xy(i + k - 1, v) for i, v in enumerate(smooth)], fill=(30, 90, 200), width=2)
        if val:
            points = [xy(s - 1, v) for s, v in val]
            if len(points) > 1:
                d.line(points, fill=(230, 120, 20), width=2)
            for x, y in points:
                d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(230, 120, 20))
            d.text((w - pad * 5, 4), "validation loss (orange)", fill=(230, 120, 20))
        d.text((2, pad // 2), f"{hi:.4g}", fill="black")
        d.text((2, h - pad - 10), f"{lo:.4g}", fill="black")
        d.text((pad, h - pad + 6), "step 1", fill="black")
        d.text((w - pad * 2, h - pad + 6), f"step {len(values)}", fill="black")
    _save_png(img, path)
    return path


def save_png(image, path: str, metadata: dict | None = None) -> str:
    """Write one PIL image as a PNG (atomically) with ``metadata`` as PNG text; return ``path``."""
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    for k, v in (metadata or {}).items():
        info.add_text(str(k), str(v))
    _save_png(image.convert("RGB"), path, info)
    return path


def _save_png(img, path: str, info=None) -> None:
    from mindone_lora_plugin.safetensors_io import atomic_path

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG", pnginfo=info)
