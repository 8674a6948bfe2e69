"""Which modules of a FLUX.1 model the LoRA presets adapt (the FLUX architecture's ``target_rules``).

Transformer:

* ``attn``: the attention projections — ``to_q``/``to_k``/``to_v``/``to_out.0`` of every block and the text-stream
  ``add_q_proj``/``add_k_proj``/``add_v_proj``/``to_add_out`` of the double blocks (diffusers'
  train_dreambooth_lora_flux.py default);
* ``kohya``: every Linear of the double (``transformer_blocks``) and single (``single_transformer_blocks``) blocks —
  attention, feed-forward, ``proj_mlp``/``proj_out`` and the AdaLN modulation ``norm*.linear`` (kohya's
  ``DoubleStreamBlock``/``SingleStreamBlock`` containers in networks/lora_flux.py).

CLIP text encoder: as for SD (``attn`` = ``q/k/v/out_proj``, ``kohya`` = attention and MLP). T5 encoder: ``attn`` =
``SelfAttention.q/k/v/o``, ``kohya`` = every Linear of its attention and gated feed-forward layers.
"""

from __future__ import annotations

from mindone_lora_plugin.architectures.base import TargetRule

ATTN = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
BLOCK_CLASSES = ("FluxTransformerBlock", "FluxSingleTransformerBlock")
CLIP_ATTN = ("q_proj", "k_proj", "v_proj", "out_proj")
CLIP_CLASSES = ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP")
T5_ATTN = ("SelfAttention.q", "SelfAttention.k", "SelfAttention.v", "SelfAttention.o")
T5_CLASSES = ("T5Attention", "T5DenseGatedActDense", "T5DenseActDense")

RULES = {
    "transformer": {"attn": TargetRule(names=tuple("attn." + n for n in ATTN)),
                    "kohya": TargetRule(containers=BLOCK_CLASSES)},
    "text_encoder": {"attn": TargetRule(names=CLIP_ATTN), "kohya": TargetRule(containers=CLIP_CLASSES)},
    "text_encoder_2": {"attn": TargetRule(names=T5_ATTN), "kohya": TargetRule(containers=T5_CLASSES)},
}
PRESETS = {"attn": "attention projections", "kohya": "all Linear layers of the double and single blocks "
                                                     "(of the text encoders' attention and MLP)"}


def targets(component: str, cell, preset, rank: int, alpha: float) -> dict[str, tuple[int, float]]:
    """Module path → ``(rank, alpha)`` for ``component`` of a FLUX model under ``preset`` (or an explicit list of
    names), as a training run's strategy picks them."""
    from mindone_lora_plugin.options import LoraOptions
    from mindone_lora_plugin.strategies.base import LoraStrategy

    options = LoraOptions(rank=rank, alpha=alpha, targets=list(preset) if isinstance(preset, tuple) else preset,
                          architecture="flux")
    return LoraStrategy().target_modules(component, cell, options)


def transformer_targets(transformer, preset, rank: int, alpha: float) -> dict[str, tuple[int, float]]:
    return targets("transformer", transformer, preset, rank, alpha)
