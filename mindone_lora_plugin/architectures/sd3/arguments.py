"""``mindone-lora train`` flags of SD3 flow-matching training, as diffusers' train_dreambooth_lora_sd3.py names them;
ignored by other families' runs. Defaults: :data:`.arch.TRAINING_DEFAULTS`. ``--logit_mean``/``--logit_std`` (and
``--discrete_flow_shift``, the scheduler shift's override) may already be there from another family's flags: they
mean the same here, so they are added only when missing. The SD3-only flags are left out of the run's arguments
unless given (``argparse.SUPPRESS``), so other families' runs record the same arguments as before."""

from __future__ import annotations

import argparse

from mindone_lora_plugin.architectures.sd3.timesteps import WEIGHTING_SCHEMES


def _add(group, *names, **kw) -> None:
    try:
        group.add_argument(*names, **kw)
    except argparse.ArgumentError:  # the same flag from another family (FLUX's --logit_mean ...)
        pass


def add_arguments(group) -> None:
    _add(group, "--weighting_scheme", choices=WEIGHTING_SCHEMES, default=argparse.SUPPRESS,
         help="SD3: how noise levels are drawn and weighted — logit_normal (default), mode, cosmap, sigma_sqrt, none")
    _add(group, "--logit_mean", type=float, default=None, help="logit_normal sampling: mean (default 0)")
    _add(group, "--logit_std", type=float, default=None, help="logit_normal sampling: std (default 1)")
    _add(group, "--mode_scale", type=float, default=argparse.SUPPRESS,
         help="SD3 mode sampling: its scale (default 1.29)")
    _add(group, "--precondition_outputs", type=int, choices=(0, 1), default=argparse.SUPPRESS,
         help="SD3: 1 (default, as diffusers) compares x_σ − σ·prediction with the latents; 0 the velocity")
    _add(group, "--discrete_flow_shift", type=float, default=None,
         help="the flow-matching time shift (default: the model's scheduler shift, 3.0 for SD3)")
