"""Noise and per-sample loss weights, drawn and computed on the host (the compiled step stays plain arithmetic).

* ``--noise_offset``: kohya's offset noise (one extra value per sample and channel);
* ``--multires_noise_iterations/--multires_noise_discount``: kohya's pyramid ("multi-resolution") noise — noise at
  successively smaller random scales, upsampled bilinearly, weighted by ``discount**i``, rescaled to unit std;
* ``--min_snr_gamma`` (= ``--snr_gamma``): Min-SNR-γ weights ``min(SNR, γ)/SNR`` (``/(SNR+1)`` for v-prediction);
* ``--debiased_estimation_loss``: weights ``1/√SNR`` (``1/(SNR+1)`` for v-prediction), SNR capped at 1000.
"""

from __future__ import annotations

import numpy as np


def draw_noise(rng: np.random.Generator, shape: tuple, args) -> np.ndarray:
    """The noise added to the latents of one batch, from ``rng`` (keyed by seed, micro-step and rank)."""
    noise = rng.standard_normal(shape, dtype=np.float32)
    if args.noise_offset:
        noise += args.noise_offset * rng.standard_normal(shape[:2] + (1, 1), dtype=np.float32)
    if getattr(args, "multires_noise_iterations", None):
        noise = pyramid_noise(noise, rng, args.multires_noise_iterations, args.multires_noise_discount)
    return noise


def pyramid_noise(noise: np.ndarray, rng: np.random.Generator, iterations: int, discount: float) -> np.ndarray:
    """kohya's ``pyramid_noise_like``: ``noise + Σ_i up(randn at size/r**i)·discount**i``, scaled to unit std."""
    b, c, h, w = noise.shape
    out = noise.astype(np.float64)
    for i in range(iterations):
        r = rng.random() * 2 + 2  # a random scale factor in [2, 4) rather than always 2
        hn, wn = max(1, int(h / r ** i)), max(1, int(w / r ** i))
        out += upsample_bilinear(rng.standard_normal((b, c, hn, wn)), h, w) * discount ** i
        if hn == 1 or wn == 1:
            break  # the lowest resolution is one pixel
    return (out / out.std()).astype(np.float32)


def upsample_bilinear(x: np.ndarray, h: int, w: int) -> np.ndarray:
    """Bilinear resize of the last two axes to ``(h, w)`` (half-pixel centres, as torch's ``align_corners=False``)."""

    def axis(n_in: int, n_out: int):
        src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
        lo = np.minimum(np.floor(src).astype(int), n_in - 1)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, (src - lo)

    lo, hi, f = axis(x.shape[-2], h)
    x = x[..., lo, :] * (1 - f)[:, None] + x[..., hi, :] * f[:, None]
    lo, hi, f = axis(x.shape[-1], w)
    return x[..., lo] * (1 - f) + x[..., hi] * f


def loss_weights(alphas_cumprod_t: np.ndarray, args, v_prediction: bool) -> np.ndarray:
    """Per-sample loss weights for timesteps whose ``ᾱ_t`` are given: Min-SNR-γ and/or debiased estimation."""
    acp = np.asarray(alphas_cumprod_t, dtype=np.float64)
    snr = acp / (1.0 - acp)
    weights = np.ones(len(acp), dtype=np.float64)
    if args.snr_gamma is not None:
        clipped = np.minimum(snr, args.snr_gamma)
        weights *= clipped / (snr + 1.0) if v_prediction else clipped / snr
    if getattr(args, "debiased_estimation_loss", False):
        capped = np.minimum(snr, 1000.0)
        weights *= 1.0 / (capped + 1.0) if v_prediction else 1.0 / np.sqrt(capped)
    return weights.astype(np.float32)
