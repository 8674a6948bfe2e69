"""The key grammar of Stable Diffusion modules without a base model: the diffusers/SGM UNet and CLIP module-name
vocabulary (kohya names are resolved back to dotted paths with it), the module paths SD LoRAs adapt, and the SGM names
among a file's keys (SGM names themselves: :mod:`.sgm`)."""

from __future__ import annotations

import re

from mindone_lora_plugin.architectures.sd import sgm
from mindone_lora_plugin.formats.names import ParsedKey, unflatten

_VOCAB = frozenset("""
down_blocks up_blocks mid_block attentions resnets downsamplers upsamplers transformer_blocks proj_in proj_out attn1
attn2 to_q to_k to_v to_out add_q_proj add_k_proj add_v_proj to_add_out ff net proj norm norm1 norm2 norm3 conv conv1
conv2 conv_shortcut time_emb_proj conv_in conv_out conv_norm_out time_embedding add_embedding linear_1 linear_2
input_blocks middle_block output_blocks in_layers out_layers emb_layers skip_connection op time_embed label_emb out
text_model encoder layers self_attn q_proj k_proj v_proj out_proj mlp fc1 fc2 text_projection embeddings
token_embedding position_embedding final_layer_norm layer_norm1 layer_norm2
""".split())

_BLOCK = r"(?:down_blocks\.\d+|up_blocks\.\d+|mid_block)"
_TCHILD = (r"(?:proj_in|proj_out|transformer_blocks\.\d+\.(?:attn[12]\.(?:to_q|to_k|to_v|to_out\.0|add_[qkv]_proj|"
           r"to_add_out)|ff\.net\.(?:0\.proj|2)))")
_RCHILD = r"(?:conv1|conv2|time_emb_proj|conv_shortcut)"
UNET_PATH_RE = re.compile(
    rf"{_BLOCK}\.attentions\.\d+\.{_TCHILD}|{_BLOCK}\.resnets\.\d+\.{_RCHILD}|down_blocks\.\d+\.downsamplers\.0\.conv|"
    r"up_blocks\.\d+\.upsamplers\.0\.conv|conv_in|conv_out|time_embedding\.linear_[12]|add_embedding\.linear_[12]")
TE_PATH_RE = re.compile(r"text_model\.encoder\.layers\.\d+\.(?:self_attn\.(?:q|k|v|out)_proj|mlp\.fc[12])|"
                        r"text_projection")


def flat_to_dotted(name: str) -> str | None:
    """Turn a kohya ``_``-joined SD module name back into a dotted path with SD's module-name vocabulary, or None."""
    return unflatten(name, _VOCAB)


def is_known_path(component: str, path: str) -> bool:
    """True when ``path`` is a module path the grammar knows for ``component`` (diffusers naming)."""
    regex = UNET_PATH_RE if component == "unet" else TE_PATH_RE
    return regex.fullmatch(path) is not None


def sgm_names(parsed: list[ParsedKey]) -> list[str]:
    """The dotted SGM UNet names among ``parsed`` (grammar-resolved for kohya names)."""
    out = []
    for pk in parsed:
        if pk.component != "unet":
            continue
        path = flat_to_dotted(pk.name) if pk.flat else pk.name
        if path and sgm.is_sgm_path(path):
            out.append(path)
    return out
