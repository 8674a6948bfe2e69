"""The kohya-ss (sd-scripts) LoRA format: what A1111-family web UIs, ComfyUI and kohya's own tools load.

One ``.safetensors`` file. Each module ``M`` has ``M.lora_down.weight``, ``M.lora_up.weight`` and ``M.alpha`` (a 0-dim
float32: the module's true alpha, scale = alpha / rank); modules of other algorithms carry their algorithm's LyCORIS
tensor names instead (``M.hada_w1_a``, ``M.lokr_w1``, ...) and the file says ``ss_network_module=lycoris.kohya``. ``M``
is ``lora_unet_`` / ``lora_te_`` (SDXL: ``lora_te1_``, ``lora_te2_``) followed by the module path with every ``.`` as
``_``. SD1.x/2.x UNet paths are diffusers paths; SDXL UNet paths are SGM paths
(``input_blocks``/``middle_block``/``output_blocks``, see :mod:`.sgm`).

The header holds kohya's minimum ``ss_*`` metadata, ``ss_output_name``, the training arguments given, the
``modelspec.*`` keys sd-scripts writes, and ``sshs_model_hash``/``sshs_legacy_hash`` computed exactly as kohya does.
"""

from __future__ import annotations

import json

import numpy as np

from mindone_lora_plugin.dtypes import numpy_dtype
from mindone_lora_plugin.errors import LoraError
from mindone_lora_plugin.formats.common import (
    PlainLoraFormat,
    is_v_prediction,
    merged_metadata,
    modelspec,
    names_for,
    writer_architecture,
)
from mindone_lora_plugin.formats.hashes import save_with_sshs
from mindone_lora_plugin.hookspecs import hookimpl
from mindone_lora_plugin.state import LoraState

NETWORK_MODULE = "networks.lora"


def kohya_module_name(component: str, path: str, architecture: str, base_config: dict | None = None) -> str:
    """The kohya name of a module (``lora_unet_input_blocks_4_1_proj_in``) for ``architecture`` (its
    :meth:`~mindone_lora_plugin.architectures.base.Architecture.kohya_name`)."""
    from mindone_lora_plugin.architectures import get_architecture

    return get_architecture(architecture).kohya_name(component, path, base_config)


def _is_conv3x3(mod) -> bool:
    return mod.is_conv and tuple(mod.kernel_size) != (1, 1)


def _alpha_str(a: float) -> str:
    return str(float(a))


def network_metadata(state: LoraState) -> tuple[dict[str, str], dict[str, str]]:
    """``ss_network_dim``/``ss_network_alpha`` (``Dynamic`` when they vary), and the ``conv_dim``/``conv_alpha`` network
    arguments when the LoRA has 3×3 conv modules (kohya's LoRA-C3Lier)."""
    mods = [m for _, _, m in state.modules()]
    lin = [m for m in mods if not _is_conv3x3(m)] or mods
    conv = [m for m in mods if _is_conv3x3(m)]
    dims, alphas = {m.rank for m in lin}, {float(m.alpha) for m in lin}
    net = {"ss_network_dim": str(dims.pop()) if len(dims) == 1 else "Dynamic",
           "ss_network_alpha": _alpha_str(alphas.pop()) if len(alphas) == 1 else "Dynamic"}
    args = {}
    if conv:
        cdims, calphas = {m.rank for m in conv}, {float(m.alpha) for m in conv}
        args["conv_dim"] = str(cdims.pop()) if len(cdims) == 1 else "Dynamic"
        args["conv_alpha"] = _alpha_str(calphas.pop()) if len(calphas) == 1 else "Dynamic"
    return net, args


def network_module(state: LoraState) -> tuple[str, dict[str, str]]:
    """``ss_network_module`` and the algorithm's ``ss_network_args`` (LyCORIS's ``algo``...) for ``state``: plain LoRA
    gives ``networks.lora``; any other algorithm its own module (``lycoris.kohya``) and arguments."""
    from mindone_lora_plugin.algorithms import get_algorithm

    names = sorted(set(state.algorithms()) - {"lora"})
    if not names:
        mods = [m for _, _, m in state.modules()]
        args = dict(get_algorithm("lora").metadata(mods)) if mods else {}
        return ("lycoris.kohya" if args else NETWORK_MODULE), args  # DoRA: LyCORIS's dora_wd

    algo = get_algorithm(names[0])
    mods = [m for _, _, m in state.modules() if m.algorithm == algo.name]
    return algo.network_module, dict(algo.metadata(mods))


def module_tensors(name: str, mod, held: str) -> dict[str, np.ndarray]:
    """The kohya tensors of one file module ``name`` (``held``: the module path(s) it holds, for errors), each in its
    own dtype; the alpha is a 0-dim float32 array (float64 beside float64 tensors) whatever the tensors' dtype, so
    that it keeps its value (float16 holds 70.21875 as 70.25, 0.3 as 0.29998); every loader reads it with ``.item()``.
    """
    algo = mod.algo
    first = np.asarray(next(iter(mod.tensors.values())))
    alpha_dtype = np.float64 if first.dtype == np.float64 else np.float32
    out = {}
    for role, value in mod.tensors.items():
        suffix = algo.kohya_names.get(role)
        if suffix is None:
            raise LoraError(f"the {mod.algorithm} algorithm has no kohya name for its '{role}' tensor "
                            f"({held}); it cannot be written in the kohya format")
        out[f"{name}.{suffix}"] = algo.file_tensor(mod, role, value, "kohya")
    out[f"{name}.alpha"] = np.asarray(float(mod.alpha), dtype=np.float64).astype(alpha_dtype)
    return out


def family_keys(keys, kohya: bool) -> int:
    """The most keys any installed architecture counts as its own in this style
    (:meth:`~mindone_lora_plugin.architectures.base.Architecture.count_file_keys`)."""
    from mindone_lora_plugin.architectures import installed_architectures

    keys = list(keys)
    return max((a.count_file_keys(keys, kohya) for a in installed_architectures().values()), default=0)


class KohyaFormat(PlainLoraFormat):
    name = "kohya"
    description = ("kohya-ss sd-scripts .safetensors (A1111/Forge, ComfyUI, kohya); lora_down/lora_up/alpha, "
                   "SDXL UNet in SGM names, ss_*/modelspec metadata")

    def supports(self, algorithm) -> bool:
        return bool(algorithm.kohya_names)

    def sniff(self, keys, metadata) -> bool:
        return self.claim(keys, metadata) > 0

    def claim(self, keys, metadata) -> int:
        """By the share of kohya (``lora_unet_…``) and ComfyUI (``diffusion_model.…``) keys."""
        from mindone_lora_plugin.formats.base import share_claim
        from mindone_lora_plugin.formats.names import algorithm_suffixes, key_prefixes, parse_key

        suffixes, prefixes = algorithm_suffixes(), key_prefixes()
        parsed = [parse_key(k, suffixes, prefixes) for k in keys]
        mine = sum(pk is not None and (pk.style in ("kohya", "comfy") or pk.flat) for pk in parsed)
        return share_claim(max(mine, family_keys(keys, True)), len(keys))

    def state_dict(self, state: LoraState, dtype=None) -> tuple[dict[str, np.ndarray], str]:
        """The kohya tensors of ``state`` cast to ``dtype`` (None: as they are), alphas as 0-dim float32 arrays, and
        the architecture used. The state is cast before a family fuses modules (FLUX's qkv), so a fused module is
        made of the very tensors its parts would be written with, and a fold of differing scales into a fused
        ``up`` is kept in float32 (:func:`~mindone_lora_plugin.architectures.flux.fuse.fuse`)."""
        from mindone_lora_plugin.architectures import get_architecture

        arch = writer_architecture(state, "kohya's module naming and metadata")
        if dtype is not None:
            state = state.astype(dtype)
        family = get_architecture(arch)
        modules = family.kohya_modules(state)  # a family whose file modules are not the state's (fused qkv)
        if modules is None:
            modules = {}
            for comp, path, mod in state.modules():
                name = family.kohya_name(comp, path, state.base_config)
                if name in modules:
                    raise LoraError(f"modules {modules[name][1]} and {comp}.{path} get the same kohya name {name}")
                modules[name] = (mod, f"{comp}.{path}")
        tensors = {}
        for name, (mod, held) in modules.items():
            tensors.update(module_tensors(name, mod, held))
        return tensors, arch

    def metadata_for(self, state: LoraState, arch: str, metadata: dict[str, str] | None,
                     output_name: str) -> dict[str, str]:
        from mindone_lora_plugin.architectures import get_architecture

        family = get_architecture(arch)
        meta = merged_metadata(state, metadata)
        output_name, title = names_for(state, metadata, output_name)
        v_pred = is_v_prediction(meta)
        names = family.kohya_metadata(meta, v_pred)
        net, conv_args = network_metadata(state)
        meta.update(net)
        module, algo_args = network_module(state)
        conv_args.update(algo_args)
        meta.update(names)
        if module == NETWORK_MODULE:
            module = family.kohya_network_module
        meta.update({"ss_network_module": module, "ss_output_name": output_name})
        if conv_args:
            try:
                args = json.loads(meta.get("ss_network_args") or "{}")
            except ValueError:
                args = {}
            args = args if isinstance(args, dict) else {}
            args.update(conv_args)
            meta["ss_network_args"] = json.dumps(args)
        meta.update(modelspec(arch, meta, title, family.kohya_implementation, v_pred, state))
        return meta

    def write(self, state: LoraState, out: str, *, dtype: str | None = None,
              metadata: dict[str, str] | None = None, output_name: str = "lora") -> str:
        if not len(state):
            raise LoraError("the LoRA has no modules; nothing to write")
        np_dtype = numpy_dtype(dtype)
        tensors, arch = self.state_dict(state, np_dtype)
        meta = self.metadata_for(state, arch, metadata, output_name)
        path = self.output_path(out, output_name)
        save_with_sshs(tensors, path, meta)  # already in their dtypes (state_dict)
        return path


@hookimpl
def mindone_lora_formats():
    yield KohyaFormat()
