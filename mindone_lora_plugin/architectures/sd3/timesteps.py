"""SD3 flow-matching noise levels and loss weights, drawn on the host, as diffusers' train_dreambooth_lora_sd3.py
(``compute_density_for_timestep_sampling`` / ``compute_loss_weighting_for_sd3``) computes them.

``--weighting_scheme`` picks how ``u ∈ [0, 1)`` is drawn — ``logit_normal`` (the default: ``sigmoid(N(logit_mean,
logit_std))``), ``mode`` (``u ← 1 − u − mode_scale·(cos²(πu/2) − 1 + u)``), otherwise uniform — and then the loss
weight: ``sigma_sqrt`` → ``σ⁻²``, ``cosmap`` → ``2 / (π·(1 − 2σ + 2σ²))``, otherwise 1. ``u`` picks one of the
scheduler's 1000 training steps, ``s = (1000 − ⌊1000u⌋) / 1000``, shifted by the scheduler's ``shift`` (3.0 for SD3):
``σ = shift·s / (1 + (shift − 1)·s)``; the transformer sees ``timestep = 1000 σ``.

With ``--precondition_outputs 1`` (diffusers' default) the prediction is preconditioned ``x̂₀ = x_σ − σ·v`` and
compared with ``x₀``: the same error as ``v`` against ``ε − x₀`` times σ, so it is that loss weighted by ``σ²``.
"""

from __future__ import annotations

import numpy as np

from mindone_lora_plugin.errors import LoraError

WEIGHTING_SCHEMES = ("logit_normal", "mode", "cosmap", "sigma_sqrt", "none")
NUM_TRAIN_TIMESTEPS = 1000


def sample_sigmas(rng: np.random.Generator, n: int, scheme: str = "logit_normal", shift: float = 3.0,
                  logit_mean: float = 0.0, logit_std: float = 1.0, mode_scale: float = 1.29) -> np.ndarray:
    """``n`` noise levels σ (float32) drawn from ``rng`` as ``scheme`` says (see the module docstring)."""
    if scheme not in WEIGHTING_SCHEMES:
        raise LoraError(f"unknown --weighting_scheme '{scheme}': choose one of {', '.join(WEIGHTING_SCHEMES)}")
    if not shift > 0:
        raise LoraError(f"the flow shift must be positive, got {shift}")
    if scheme == "logit_normal":
        u = 1.0 / (1.0 + np.exp(-rng.normal(logit_mean, logit_std, n)))
    else:
        u = rng.random(n)
        if scheme == "mode":
            u = 1.0 - u - mode_scale * (np.cos(np.pi * u / 2) ** 2 - 1.0 + u)
    index = np.clip((u * NUM_TRAIN_TIMESTEPS).astype(np.int64), 0, NUM_TRAIN_TIMESTEPS - 1)
    s = (NUM_TRAIN_TIMESTEPS - index) / NUM_TRAIN_TIMESTEPS
    return (shift * s / (1.0 + (shift - 1.0) * s)).astype(np.float32)


def loss_weights(sigmas: np.ndarray, scheme: str = "logit_normal", precondition: bool = True) -> np.ndarray:
    """Per-sample loss weights (float64) of ``sigmas`` under ``scheme``, × σ² when the outputs are preconditioned."""
    sigmas = sigmas.astype(np.float64)
    if scheme == "sigma_sqrt":
        weights = sigmas ** -2.0
    elif scheme == "cosmap":
        weights = 2.0 / (np.pi * (1.0 - 2.0 * sigmas + 2.0 * sigmas ** 2))
    else:
        weights = np.ones_like(sigmas)
    return weights * sigmas ** 2 if precondition else weights
