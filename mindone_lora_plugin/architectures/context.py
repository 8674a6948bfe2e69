"""What the trainer gives a model family while it trains: a :class:`TrainingContext`, never the trainer itself.

A family reads the run's flags, its own loaded parts and models, the text conditioner it made, and asks
:class:`BatchInputs` for what a batch holds (latents, text inputs, DreamBooth's weighting, the loss mask). It sets
nothing on the run; what it computes, it returns (a loss cell, a tuple of inputs, a pipeline).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # pragma: no cover
    import argparse

    import numpy as np

    from mindone_lora_plugin.architectures.base import TrainingParts
    from mindone_lora_plugin.models import Models


class BatchInputs(Protocol):
    """A batch as the loss needs it; the trainer's data side implements it (caches included)."""

    def latents(self, batch, rng) -> np.ndarray:
        """The batch's latents: a draw from the VAE's posterior (cached or encoded now), shifted and scaled as the
        VAE's config says. float32, NCHW."""

    def text(self, batch) -> tuple:
        """The batch's text input: cached ``(embeds, pooled)``, the token ids ``(ids, ids_2)`` when text encoders
        train, or the frozen encoders' ``(embeds, pooled)``."""

    def prior_weighted(self, weights: np.ndarray, n: int) -> np.ndarray:
        """``weights`` with DreamBooth's prior-preservation weighting applied (unchanged without class images)."""

    def mask(self, batch, latent_hw: tuple[int, int]) -> tuple:
        """``(mask tensor,)`` at the latents' size with ``--masked_loss``, else ``()``: the loss cell's last input."""


@dataclass(frozen=True)
class TrainingContext:
    """Everything a family's training methods may use (:meth:`~mindone_lora_plugin.architectures.base.Architecture.
    make_loss`, :meth:`~mindone_lora_plugin.architectures.base.Architecture.model_inputs`)."""

    args: argparse.Namespace  # the run's parsed flags
    models: Models  # the family's components, adapters added
    parts: TrainingParts  # what the family's load_training_parts returned
    conditioner: object  # the cell the family's text_conditioner made
    train_text: bool  # whether text encoders train (the loss then runs the conditioner on token ids)
    inputs: BatchInputs
