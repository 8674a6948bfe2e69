"""Flow-matching noise levels for FLUX.1 LoRA training, drawn on the host (the compiled step stays arithmetic).

``--timestep_sampling`` (σ ∈ (0, 1] is the noise level; the model sees ``t = σ``, ``timestep = 1000 σ``):

* ``sigma`` (diffusers' train_dreambooth_lora_flux.py, ``weighting_scheme=none``): ``u ~ U[0, 1)`` picks one of the
  scheduler's 1000 discrete training steps, ``s = (1000 - ⌊1000 u⌋) / 1000``, shifted by ``--discrete_flow_shift``:
  ``σ = shift·s / (1 + (shift − 1)·s)``;
* ``logit_normal`` (diffusers' ``weighting_scheme=logit_normal``): the same, with ``u = sigmoid(N(logit_mean,
  logit_std))``;
* ``uniform`` (kohya's flux_train_network ``uniform``): ``σ ~ U[0, 1)``, no shift;
* ``shift`` (kohya's ``shift``): ``σ = sigmoid(sigmoid_scale · N(0, 1))``, then shifted by ``--discrete_flow_shift``.

The loss weighting is none (1 per sample; DreamBooth prior weights multiply in as for SD).
"""

from __future__ import annotations

import numpy as np

from mindone_lora_plugin.errors import LoraError

SAMPLINGS = ("sigma", "uniform", "logit_normal", "shift")
NUM_TRAIN_TIMESTEPS = 1000


def shift_sigmas(s: np.ndarray, shift: float) -> np.ndarray:
    """FLUX's (SD3's) time shift ``shift·s / (1 + (shift − 1)·s)``."""
    return shift * s / (1.0 + (shift - 1.0) * s)


def sample_sigmas(rng: np.random.Generator, n: int, sampling: str = "sigma", shift: float = 3.0,
                  logit_mean: float = 0.0, logit_std: float = 1.0, sigmoid_scale: float = 1.0) -> np.ndarray:
    """``n`` noise levels σ (float32) drawn from ``rng`` as ``sampling`` says (see the module docstring)."""
    if sampling not in SAMPLINGS:
        raise LoraError(f"unknown --timestep_sampling '{sampling}': choose one of {', '.join(SAMPLINGS)}")
    if not shift > 0:
        raise LoraError(f"--discrete_flow_shift must be positive, got {shift}")
    if sampling in ("sigma", "logit_normal"):
        if sampling == "sigma":
            u = rng.random(n)
        else:
            u = 1.0 / (1.0 + np.exp(-rng.normal(logit_mean, logit_std, n)))
        index = np.minimum((u * NUM_TRAIN_TIMESTEPS).astype(np.int64), NUM_TRAIN_TIMESTEPS - 1)
        sigmas = shift_sigmas((NUM_TRAIN_TIMESTEPS - index) / NUM_TRAIN_TIMESTEPS, shift)
    elif sampling == "uniform":
        sigmas = rng.random(n)
    else:
        sigmas = shift_sigmas(1.0 / (1.0 + np.exp(-sigmoid_scale * rng.standard_normal(n))), shift)
    return sigmas.astype(np.float32)
