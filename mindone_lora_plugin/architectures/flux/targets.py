"""Which modules of a FLUX.1 transformer the LoRA presets adapt.

* ``attn``: the attention projections — ``to_q``/``to_k``/``to_v``/``to_out.0`` of every block and the text-stream
  ``add_q_proj``/``add_k_proj``/``add_v_proj``/``to_add_out`` of the double blocks (diffusers'
  train_dreambooth_lora_flux.py default);
* ``kohya``: every Linear of the double (``transformer_blocks``) and single (``single_transformer_blocks``) blocks —
  attention, feed-forward, ``proj_mlp``/``proj_out`` and the AdaLN modulation ``norm*.linear`` (kohya's
  ``DoubleStreamBlock``/``SingleStreamBlock`` containers in networks/lora_flux.py).

The T5 and CLIP text encoders use the SD text-encoder presets (:mod:`mindone_lora_plugin.strategies.base`).
"""

from __future__ import annotations

from mindone_lora_plugin.errors import LoraError
from mindone_lora_plugin.strategies.base import adaptable_layers

ATTN = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
BLOCK_CLASSES = ("FluxTransformerBlock", "FluxSingleTransformerBlock")
PRESETS = {"attn": "attention projections of the double and single blocks",
           "kohya": "all Linear layers of the double and single blocks"}


def transformer_targets(transformer, preset: str | list[str], rank: int, alpha: float) -> dict[str, tuple[int, float]]:
    """Module path → ``(rank, alpha)`` for the FLUX transformer under ``preset`` (or an explicit list of names,
    matched against the end of each module path as PEFT's ``target_modules`` does)."""
    if isinstance(preset, (list, tuple)):
        return {p: (rank, alpha) for p, _ in adaptable_layers(transformer)
                if any(p == t or p.endswith("." + t) for t in preset)}
    if preset == "attn":
        return {p: (rank, alpha) for p, _ in adaptable_layers(transformer, BLOCK_CLASSES)
                if any(p.endswith(".attn." + n) for n in ATTN)}
    if preset == "kohya":
        return {p: (rank, alpha) for p, _ in adaptable_layers(transformer, BLOCK_CLASSES)}
    raise LoraError(f"unknown FLUX target preset '{preset}': choose one of {', '.join(PRESETS)} or give module names")
