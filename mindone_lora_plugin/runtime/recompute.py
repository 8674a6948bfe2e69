"""Gradient checkpointing for mindone's UNets and CLIP text encoders, with MindSpore's recompute.

mindone 0.5.0's ``ModelMixin.enable_gradient_checkpointing`` looks for a ``recompute_`` attribute that no block
defines, so it raises "does not support gradient checkpointing" on every device. This module does what it means to
do: ``Cell.recompute()`` on each ResNet block and each transformer block (the granularity diffusers checkpoints at),
and on each CLIP encoder layer. A recomputed cell keeps only its inputs during the forward pass and runs again in the
backward pass, so activations inside the blocks are never held all at once. It works in GRAPH_MODE (the compiler marks
the blocks' operations for recomputation) and in PyNative (MindSpore wraps the blocks' ``construct``), on CPU and on
Ascend; losses and gradients are unchanged (to float rounding).

The blocks are chosen by class: :data:`BLOCK_CLASSES` names them. Enabling twice is harmless (a block already set is
skipped), and LoRA adapters may be added before or after (they live inside the blocks and are found at call time).
"""

from __future__ import annotations

from mindone_lora_plugin.errors import LoraError

#: (module, class name) of the cells recomputed: the blocks diffusers' and transformers' checkpointing wraps
BLOCK_CLASSES = (
    ("mindone.diffusers.models.resnet", "ResnetBlock2D"),
    ("mindone.diffusers.models.attention", "BasicTransformerBlock"),
    ("mindone.transformers.models.clip.modeling_clip", "CLIPEncoderLayer"),
)

_MARK = "_mindone_lora_recompute"


def block_types() -> tuple[type, ...]:
    import importlib

    found = []
    for module, name in BLOCK_CLASSES:
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):  # pragma: no cover - a different mindone layout
            continue
    return tuple(found)


def blocks(cell) -> list:
    """The outermost cells of ``cell`` that are recompute blocks (a block inside a block is not listed)."""
    types = block_types()
    out, taken = [], []
    for name, sub in cell.cells_and_names():
        if any(name.startswith(p) for p in taken):
            continue
        if isinstance(sub, types):
            out.append(sub)
            taken.append(name + ".")
    return out


def enable(cell, what: str = "the model") -> int:
    """Recompute every block of ``cell`` in the backward pass; returns how many blocks are set.

    A cell with no block to recompute is refused with one line (``--gradient_checkpointing`` would change nothing).
    """
    found = blocks(cell)
    if not found:
        raise LoraError(f"--gradient_checkpointing: {what} ({type(cell).__name__}) has no ResNet, transformer or CLIP "
                        f"encoder blocks to recompute; drop the flag")
    for block in found:
        if not getattr(block, _MARK, False):
            block.recompute()
            object.__setattr__(block, _MARK, True)
    return len(found)


def is_enabled(cell) -> bool:
    return any(getattr(b, _MARK, False) for b in blocks(cell))


def enable_for_training(models, components) -> dict[str, int]:
    """:func:`enable` on each named component of a :class:`~mindone_lora_plugin.models.Models` bundle that is
    present; returns component → number of recomputed blocks."""
    return {c: enable(models[c], c) for c in components if c in models}
