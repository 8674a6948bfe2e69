"""``mindone-lora train`` flags of FLUX.1 flow-matching training (diffusers' and kohya's names); ignored by SD runs.
Defaults: :data:`.arch.TRAINING_DEFAULTS`."""

from __future__ import annotations

from mindone_lora_plugin.architectures.flux.timesteps import SAMPLINGS


def add_arguments(group) -> None:
    group.add_argument("--timestep_sampling", choices=SAMPLINGS, default=None,
                       help="FLUX: how noise levels are drawn — sigma (diffusers: uniform over the shifted discrete "
                            "schedule, default), logit_normal (diffusers), uniform or shift (kohya)")
    group.add_argument("--discrete_flow_shift", type=float, default=None,
                       help="FLUX: the time shift of the sigma/logit_normal/shift samplings (default: the model's "
                            "scheduler shift, 3.0 for FLUX.1-dev)")
    group.add_argument("--guidance_scale", type=float, default=None,
                       help="FLUX.1-dev: the embedded guidance value the transformer sees while training (default "
                            "3.5, as in diffusers and kohya)")
    group.add_argument("--logit_mean", type=float, default=None, help="FLUX logit_normal sampling: mean (default 0)")
    group.add_argument("--logit_std", type=float, default=None, help="FLUX logit_normal sampling: std (default 1)")
    group.add_argument("--sigmoid_scale", type=float, default=None,
                       help="FLUX shift sampling: scale of the normal draw before the sigmoid (default 1)")
