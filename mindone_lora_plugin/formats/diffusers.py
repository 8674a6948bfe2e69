"""The diffusers/PEFT LoRA format: what mindone and Hugging Face diffusers ``load_lora_weights`` read.

``pytorch_lora_weights.safetensors`` with pure PEFT keys — ``unet.<module path>.lora_A.weight`` (down) and
``.lora_B.weight`` (up), ``text_encoder.…``, ``text_encoder_2.…`` — never the mixed ``.lora.down``/``lora_A`` style that
mindone 0.5.0's ``convert_state_dict_to_diffusers`` produces (its loader then silently skips the attention weights).

Alphas live in the ``lora_adapter_metadata`` header entry, a JSON string (sorted keys, indent 2) of ``LoraConfig``
fields prefixed with the component (``unet.r``, ``unet.lora_alpha``, ``unet.target_modules``, ``unet.rank_pattern``,
``unet.alpha_pattern``, …): ``r``/``lora_alpha`` are the most common values and the patterns hold every other module
under its exact path, so mindone 0.5.0 and diffusers 0.39 both rebuild each module's scale exactly. Without that entry
both libraries take ``lora_alpha = r``; the reader here does the same.
"""

from __future__ import annotations

import json
from collections import Counter

from mindone_lora_plugin import safetensors_io
from mindone_lora_plugin.dtypes import as_dtype, numpy_dtype
from mindone_lora_plugin.errors import LoraError
from mindone_lora_plugin.formats.common import PlainLoraFormat, merged_metadata, modelspec
from mindone_lora_plugin.hookspecs import hookimpl
from mindone_lora_plugin.state import LoraState, most_common

WEIGHT_NAME = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"
# LoraConfig fields written besides r/lora_alpha/target_modules/rank_pattern/alpha_pattern: all exist in both
# mindone 0.5.0's and peft 0.21's LoraConfig and hold their defaults
_FIXED_FIELDS = {"lora_dropout": 0.0, "bias": "none", "use_rslora": False, "fan_in_fan_out": False,
                 "init_lora_weights": True}


def _number(a: float):
    a = float(a)
    return int(a) if a.is_integer() else a


def _anchored(path: str, paths) -> str:
    """A rank/alpha pattern key matching only ``path``: peft and mindone match ``(.*\\.)?(key)$``, so a path that
    ends another one (FLUX's top-level ``proj_out`` and ``single_transformer_blocks.0.proj_out``) gets ``^``."""
    return "^" + path if any(p != path and p.endswith("." + path) for p in paths) else path


def adapter_config(modules: dict) -> dict:
    """The ``LoraConfig`` fields for one component's ``{module path: LoraModule}``."""
    r = most_common(Counter(m.rank for m in modules.values()))
    alpha = most_common(Counter(float(m.alpha) for m in modules.values()))
    cfg = {
        "r": int(r),
        "lora_alpha": _number(alpha),
        "target_modules": sorted(modules),
        "rank_pattern": {_anchored(p, modules): m.rank for p, m in sorted(modules.items()) if m.rank != r},
        "alpha_pattern": {_anchored(p, modules): _number(m.alpha) for p, m in sorted(modules.items())
                          if float(m.alpha) != alpha},
    }
    cfg.update(_FIXED_FIELDS)
    if any("magnitude" in m.tensors for m in modules.values()):
        cfg["use_dora"] = True  # DoRA: diffusers/peft then inject every lora_magnitude_vector
    return cfg


def adapter_metadata(state: LoraState) -> dict:
    """``{"<component>.<field>": value}`` for every component of ``state``."""
    out = {}
    for comp in state.components:
        mods = state.components[comp]
        if mods:
            for field, value in adapter_config(mods).items():
                out[f"{comp}.{field}"] = value
    return out


class DiffusersFormat(PlainLoraFormat):
    name = "diffusers"
    description = ("diffusers/PEFT pytorch_lora_weights.safetensors (mindone and HF diffusers load_lora_weights); "
                   "lora_A/lora_B keys, per-module alphas in lora_adapter_metadata")

    def default_filename(self, output_name: str) -> str:
        return WEIGHT_NAME

    def sniff(self, keys, metadata) -> bool:
        return self.claim(keys, metadata) > 0

    def claim(self, keys, metadata) -> int:
        """Sure with a ``lora_adapter_metadata`` entry; else by the share of dotted diffusers/PEFT keys."""
        from mindone_lora_plugin.formats.base import CLAIM_SURE, share_claim
        from mindone_lora_plugin.formats.names import algorithm_suffixes, key_prefixes, parse_key

        if METADATA_KEY in (metadata or {}):
            return CLAIM_SURE
        suffixes, prefixes = algorithm_suffixes(), key_prefixes()
        parsed = [parse_key(k, suffixes, prefixes) for k in keys]
        mine = sum(pk is not None and not pk.flat and pk.style not in ("kohya", "comfy") for pk in parsed)
        from mindone_lora_plugin.formats.kohya import family_keys

        return share_claim(max(mine, family_keys(keys, False)), len(keys))

    def supports(self, algorithm) -> bool:
        return algorithm.peft_names is not None

    def state_dict(self, state: LoraState, dtype=None) -> dict:
        self.check_algorithms(state)
        tensors = {}
        for comp, path, mod in state.modules():
            names = mod.algo.peft_names
            for role, value in mod.tensors.items():
                value = mod.algo.file_tensor(mod, role, value, "peft")
                tensors[f"{comp}.{path}.{names[role]}"] = as_dtype(value, dtype)
        return tensors

    def metadata_for(self, state: LoraState, metadata: dict[str, str] | None, output_name: str) -> dict[str, str]:
        from mindone_lora_plugin.formats.common import is_v_prediction, names_for, writer_architecture

        meta = merged_metadata(state, metadata)
        arch = writer_architecture(state, "the metadata", required=False)
        if arch is not None:
            title = names_for(state, metadata, output_name)[1]
            meta.update(modelspec(arch, meta, title, "diffusers", is_v_prediction(meta), state))
        meta["format"] = "np"
        meta[METADATA_KEY] = json.dumps(adapter_metadata(state), indent=2, sort_keys=True)
        return meta

    def write(self, state: LoraState, out: str, *, dtype: str | None = None,
              metadata: dict[str, str] | None = None, output_name: str = "lora") -> str:
        if not len(state):
            raise LoraError("the LoRA has no modules; nothing to write")
        self.check_algorithms(state)
        np_dtype = numpy_dtype(dtype)
        tensors = self.state_dict(state, np_dtype)
        meta = self.metadata_for(state, metadata, output_name)
        path = self.output_path(out, output_name)
        return safetensors_io.save(tensors, path, meta)


@hookimpl
def mindone_lora_formats():
    yield DiffusersFormat()
