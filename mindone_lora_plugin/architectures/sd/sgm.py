"""SDXL UNet module paths: diffusers ⇄ SGM (the original Stability ``input_blocks``/``middle_block``/``output_blocks``).

kohya's sd-scripts names SDXL UNet LoRA modules after the SGM module tree, so a kohya SDXL file spells
``down_blocks.1.attentions.0.proj_in`` as ``input_blocks.4.1.proj_in``. The mapping depends only on the UNet's
``layers_per_block`` (L): a down block has L resnets (+ a downsampler), an up block L + 1 resnets (+ an upsampler), and
SGM numbers every resnet/attention pair, downsampler and upsampler as one ``input_blocks``/``output_blocks`` entry::

    down_blocks.b.resnets.j.X      → input_blocks.{1 + b(L+1) + j}.0.res(X)
    down_blocks.b.attentions.j.X   → input_blocks.{1 + b(L+1) + j}.1.X
    down_blocks.b.downsamplers.0.conv → input_blocks.{(b+1)(L+1)}.0.op
    mid_block.resnets.0 / attentions.0 / resnets.1 → middle_block.0 / .1 / .2
    up_blocks.b.resnets.j.X        → output_blocks.{b(L+1) + j}.0.res(X)
    up_blocks.b.attentions.j.X     → output_blocks.{b(L+1) + j}.1.X
    up_blocks.b.upsamplers.0.conv  → output_blocks.{b(L+1) + L}.{2 if the up block has attentions else 1}.conv

with ``res()`` renaming ``conv1→in_layers.2``, ``time_emb_proj→emb_layers.1``, ``conv2→out_layers.3``,
``conv_shortcut→skip_connection`` (``norm1→in_layers.0``, ``norm2→out_layers.0``). Transformer children keep their
names. The modules outside the blocks map too (``conv_in → input_blocks.0.0``, ``time_embedding.linear_1 →
time_embed.0``, ``add_embedding.linear_1 → label_emb.0.0``, ``conv_out → out.2``), though no LoRA trainer targets them.

Functions here raise :class:`ValueError` for a path they cannot map; callers turn it into a user error.
"""

from __future__ import annotations

import re

DEFAULT_LAYERS_PER_BLOCK = 2  # SD1.x, SD2.x and SDXL all use 2

_RES_TO_SGM = {"conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "conv2": "out_layers.3",
               "conv_shortcut": "skip_connection", "norm1": "in_layers.0", "norm2": "out_layers.0"}
_RES_FROM_SGM = {v: k for k, v in _RES_TO_SGM.items()}
_OUTSIDE_TO_SGM = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
                   "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
                   "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"}
_OUTSIDE_FROM_SGM = {v: k for k, v in _OUTSIDE_TO_SGM.items()}

_SGM_ROOTS = ("input_blocks.", "middle_block.", "output_blocks.", "time_embed.", "label_emb.", "out.")
_DIFFUSERS_ROOTS = ("down_blocks.", "mid_block.", "up_blocks.", "conv_in", "conv_out", "conv_norm_out",
                    "time_embedding.", "add_embedding.")

_RE_DOWN = re.compile(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.(.+)")
_RE_UP = re.compile(r"up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)\.(.+)")
_RE_MID = re.compile(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)")
_RE_IN = re.compile(r"input_blocks\.(\d+)\.(\d+)\.(.+)")
_RE_MIDDLE = re.compile(r"middle_block\.(\d+)\.(.+)")
_RE_OUT = re.compile(r"output_blocks\.(\d+)\.(\d+)\.(.+)")


def is_sgm_path(path: str) -> bool:
    """True for a UNet module path in SGM naming (``input_blocks.4.1.proj_in``, ``middle_block.1...``)."""
    return path.startswith(_SGM_ROOTS) or path in ("input_blocks.0.0",)


def is_diffusers_unet_path(path: str) -> bool:
    return path.startswith(_DIFFUSERS_ROOTS)


def _res_to_sgm(child: str, path: str) -> str:
    if child not in _RES_TO_SGM:
        raise ValueError(f"no SGM name for resnet child '{child}' in {path}")
    return _RES_TO_SGM[child]


def diffusers_to_sgm(path: str, layers_per_block: int | None = None,
                     up_block_has_attentions=None) -> str:
    """Map a diffusers UNet module path to its SGM path.

    ``up_block_has_attentions(b) -> bool`` tells where an up block's upsampler goes; by default every up block that
    has an upsampler is taken to have attentions (true for SDXL, and what kohya's SDXL table assumes).
    """
    L = layers_per_block or DEFAULT_LAYERS_PER_BLOCK
    if path in _OUTSIDE_TO_SGM:
        return _OUTSIDE_TO_SGM[path]
    m = _RE_DOWN.fullmatch(path)
    if m:
        b, kind, j, child = int(m[1]), m[2], int(m[3]), m[4]
        if kind == "downsamplers":
            if j != 0 or child != "conv":
                raise ValueError(f"unexpected downsampler module {path}")
            return f"input_blocks.{(b + 1) * (L + 1)}.0.op"
        if j >= L:
            raise ValueError(f"{path}: a down block has only {L} {kind} with layers_per_block={L}")
        idx = 1 + b * (L + 1) + j
        if kind == "resnets":
            return f"input_blocks.{idx}.0.{_res_to_sgm(child, path)}"
        return f"input_blocks.{idx}.1.{child}"
    m = _RE_MID.fullmatch(path)
    if m:
        kind, j, child = m[1], int(m[2]), m[3]
        if kind == "resnets" and j in (0, 1):
            return f"middle_block.{2 * j}.{_res_to_sgm(child, path)}"
        if kind == "attentions" and j == 0:
            return f"middle_block.1.{child}"
        raise ValueError(f"unexpected mid-block module {path}")
    m = _RE_UP.fullmatch(path)
    if m:
        b, kind, j, child = int(m[1]), m[2], int(m[3]), m[4]
        if kind == "upsamplers":
            if j != 0 or child != "conv":
                raise ValueError(f"unexpected upsampler module {path}")
            has_attn = True if up_block_has_attentions is None else bool(up_block_has_attentions(b))
            return f"output_blocks.{b * (L + 1) + L}.{2 if has_attn else 1}.conv"
        if j > L:
            raise ValueError(f"{path}: an up block has only {L + 1} {kind} with layers_per_block={L}")
        idx = b * (L + 1) + j
        if kind == "resnets":
            return f"output_blocks.{idx}.0.{_res_to_sgm(child, path)}"
        return f"output_blocks.{idx}.1.{child}"
    raise ValueError(f"{path} is not a diffusers UNet module path")


def sgm_to_diffusers(path: str, layers_per_block: int | None = None) -> str:
    """Map an SGM UNet module path back to the diffusers path (inverse of :func:`diffusers_to_sgm`)."""
    L = layers_per_block or DEFAULT_LAYERS_PER_BLOCK
    if path in _OUTSIDE_FROM_SGM:
        return _OUTSIDE_FROM_SGM[path]
    m = _RE_IN.fullmatch(path)
    if m:
        i, inner, child = int(m[1]), int(m[2]), m[3]
        if i == 0:
            raise ValueError(f"{path}: input_blocks.0 holds only conv_in")
        if inner == 0 and child == "op":
            if i % (L + 1):
                raise ValueError(f"{path}: no downsampler at input block {i} with layers_per_block={L}")
            return f"down_blocks.{i // (L + 1) - 1}.downsamplers.0.conv"
        b, j = divmod(i - 1, L + 1)
        if j == L:
            raise ValueError(f"{path}: input block {i} is a downsampler with layers_per_block={L}")
        if inner == 0:
            if child not in _RES_FROM_SGM:
                raise ValueError(f"{path}: unknown resnet child '{child}'")
            return f"down_blocks.{b}.resnets.{j}.{_RES_FROM_SGM[child]}"
        if inner == 1:
            return f"down_blocks.{b}.attentions.{j}.{child}"
        raise ValueError(f"{path}: unexpected inner index {inner}")
    m = _RE_MIDDLE.fullmatch(path)
    if m:
        inner, child = int(m[1]), m[2]
        if inner in (0, 2):
            if child not in _RES_FROM_SGM:
                raise ValueError(f"{path}: unknown resnet child '{child}'")
            return f"mid_block.resnets.{inner // 2}.{_RES_FROM_SGM[child]}"
        if inner == 1:
            return f"mid_block.attentions.0.{child}"
        raise ValueError(f"{path}: the middle block has only 3 parts")
    m = _RE_OUT.fullmatch(path)
    if m:
        i, inner, child = int(m[1]), int(m[2]), m[3]
        b, j = divmod(i, L + 1)
        if inner == 0:
            if child not in _RES_FROM_SGM:
                raise ValueError(f"{path}: unknown resnet child '{child}'")
            return f"up_blocks.{b}.resnets.{j}.{_RES_FROM_SGM[child]}"
        if (inner == 2 or (inner == 1 and child == "conv")):
            if child != "conv" or j != L:
                raise ValueError(f"{path}: no upsampler there with layers_per_block={L}")
            return f"up_blocks.{b}.upsamplers.0.conv"
        if inner == 1:
            return f"up_blocks.{b}.attentions.{j}.{child}"
        raise ValueError(f"{path}: unexpected inner index {inner}")
    raise ValueError(f"{path} is not an SGM UNet module path")


def infer_layers_per_block(sgm_paths) -> int | None:
    """Guess ``layers_per_block`` from SGM paths, or None when they say nothing about it.

    A downsampler sits at ``input_blocks.{(b+1)(L+1)}``, an upsampler at ``output_blocks.{b(L+1)+L}``, and no
    resnet/attention at an input block whose ``(i-1) % (L+1) == L``. The standard value 2 wins when it fits.
    """
    constraints, preferred = [], [DEFAULT_LAYERS_PER_BLOCK]
    ops, ups = [], []
    for p in sgm_paths:
        m = _RE_IN.fullmatch(p)
        if m and int(m[1]) > 0:
            i = int(m[1])
            if m[2] == "0" and m[3] == "op":
                ops.append(i)
                constraints.append(lambda L, i=i: i % (L + 1) == 0)
            else:
                constraints.append(lambda L, i=i: (i - 1) % (L + 1) != L)
            continue
        m = _RE_OUT.fullmatch(p)
        if m and m[3] == "conv" and m[2] in ("1", "2"):
            i = int(m[1])
            ups.append(i)
            constraints.append(lambda L, i=i: i % (L + 1) == L)
    if not constraints:
        return None
    # the first block's downsampler sits at input_blocks.{L+1}, its upsampler at output_blocks.{L}
    if ops:
        preferred.append(min(ops) - 1)
    if ups:
        preferred.append(min(ups))
    for L in tuple(preferred) + tuple(range(1, 16)):
        if L >= 1 and all(c(L) for c in constraints):
            return L
    return None
