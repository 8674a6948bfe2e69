"""Which modules of an SD3 model the LoRA presets adapt (the SD3 architecture's ``target_rules``).

Transformer:

* ``attn`` (the default, as diffusers' train_dreambooth_lora_sd3.py): the attention projections — ``to_q``/``to_k``/
  ``to_v``/``to_out.0``, the context stream's ``add_q_proj``/``add_k_proj``/``add_v_proj``/``to_add_out`` and SD3.5's
  second attention ``attn2.*``;
* ``all-linear`` (kohya sd-scripts' default, its ``lora_sd3`` network on every Linear of the joint blocks): every Linear
  of the ``JointTransformerBlock`` s — attention, feed-forward and the AdaLN modulation ``norm1*.linear``.

CLIP-L/CLIP-G text encoders: ``attn`` = ``q/k/v/out_proj``, ``all-linear`` = attention and MLP. T5 the same way.
"""

from __future__ import annotations

from mindone_lora_plugin.architectures.base import TargetRule

ATTN = tuple(f"attn.{n}" for n in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                                   "to_add_out")) + tuple(f"attn2.{n}" for n in ("to_q", "to_k", "to_v", "to_out.0"))
BLOCK_CLASSES = ("JointTransformerBlock",)
CLIP_ATTN = ("q_proj", "k_proj", "v_proj", "out_proj")
CLIP_CLASSES = ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP")
T5_ATTN = ("SelfAttention.q", "SelfAttention.k", "SelfAttention.v", "SelfAttention.o")
T5_CLASSES = ("T5Attention", "T5DenseGatedActDense", "T5DenseActDense")

_CLIP = {"attn": TargetRule(names=CLIP_ATTN), "all-linear": TargetRule(containers=CLIP_CLASSES)}
RULES = {
    "transformer": {"attn": TargetRule(names=ATTN), "all-linear": TargetRule(containers=BLOCK_CLASSES)},
    "text_encoder": _CLIP,
    "text_encoder_2": _CLIP,
    "text_encoder_3": {"attn": TargetRule(names=T5_ATTN), "all-linear": TargetRule(containers=T5_CLASSES)},
}
PRESETS = {"attn": "attention projections (diffusers' default)",
           "all-linear": "every Linear of the joint blocks (kohya sd-scripts' default)"}
