"""Base models given as one file: a single-file checkpoint (the original A1111/ComfyUI layout) turned into the
diffusers-layout folder every loader reads.

:func:`resolve_model` passes a folder through. A file is checked (pickles refused, the safetensors header validated:
a truncated file is one clear error), then every installed architecture is asked whether it knows the file's keys
(:meth:`~mindone_lora_plugin.architectures.base.Architecture.detect_single_file`); the one that scores highest writes
the equivalent diffusers-layout folder (:meth:`~mindone_lora_plugin.architectures.base.Architecture.
write_single_file_folder`), tensor by tensor from a memory map, dtypes kept. The folder is written once into a cache
(``$MINDONE_LORA_CACHE`` or ``~/.cache/mindone-lora``) under a key of the file's path, size and modification time and
the options given, atomically; later calls reuse it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

from mindone_lora_plugin.errors import LoraError

CACHE_ENV = "MINDONE_LORA_CACHE"
FORMAT = 1  # bump when the written folders change


def cache_root() -> str:
    root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "mindone-lora")
    return os.path.join(root, "single-file")


def is_single_file(path: str) -> bool:
    return bool(path) and (os.path.isfile(path) or (not os.path.isdir(path) and os.path.splitext(path)[1] != ""))


def detect_single_file(path: str):
    """``(architecture, header)`` of a single-file checkpoint, asking every installed architecture; one
    :class:`LoraError` line for a pickle, a truncated file or a file no installed architecture knows."""
    from mindone_lora_plugin.architectures import installed_architectures
    from mindone_lora_plugin.safetensors_io import PICKLE_SUFFIXES, read_header

    if path.lower().endswith(PICKLE_SUFFIXES):
        raise LoraError(f"{path} is a pickle checkpoint, which can run arbitrary code when loaded, so it is never "
                        "read; convert it to .safetensors in a sandbox you trust (e.g. load it with torch.load(..., "
                        "weights_only=True) and save it with safetensors.torch.save_file) and pass that file")
    header, _ = read_header(path)
    metadata = dict(header.get("__metadata__") or {})
    keys = [k for k in header if k != "__metadata__"]
    best, best_score = None, 0
    for arch in installed_architectures().values():
        score = int(arch.detect_single_file(keys, header, metadata, path) or 0)
        if score > best_score:
            best, best_score = arch, score
    if best is None:
        sample = ", ".join(sorted(keys)[:3]) or "no tensors"
        raise LoraError(f"{path} is no single-file checkpoint of an installed model family "
                        f"({', '.join(installed_architectures())}; its keys start: {sample}); pass a diffusers-layout "
                        "model folder or a checkpoint in the original (A1111/ComfyUI) layout")
    return best, header


def resolve_model(path: str, vae: str | None = None, config: str | None = None) -> str:
    """The diffusers-layout folder for ``path``: ``path`` itself when it is a folder, else the converted folder of a
    single-file checkpoint (``vae``: a VAE file that replaces the checkpoint's; ``config``: a diffusers-layout folder
    whose configs, tokenizers and scheduler the family uses)."""
    if not is_single_file(path):
        for flag, value in (("--vae", vae), ("--model_config", config)):
            if value:
                raise LoraError(f"{flag} applies to a single-file checkpoint; {path} is a model folder, whose own "
                                "VAE and configs are used")
        return path
    if not os.path.isfile(path):
        raise LoraError(f"model {path} does not exist: pass a diffusers-layout model folder or a .safetensors "
                        "single-file checkpoint")
    for flag, value, ok in (("--vae", vae, os.path.isfile), ("--model_config", config, os.path.isdir)):
        if value and not ok(value):
            raise LoraError(f"{flag} {value} is not {'a file' if flag == '--vae' else 'a folder'}")
    arch, header = detect_single_file(path)
    stat = os.stat(path)
    parts = [FORMAT, arch.name, os.path.abspath(path), stat.st_size, int(stat.st_mtime)]
    for extra in (vae, config):
        if extra:
            st = os.stat(extra)
            parts += [os.path.abspath(extra), st.st_size, int(st.st_mtime)]
    key = hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:20]
    name = os.path.splitext(os.path.basename(path))[0]
    out = os.path.join(cache_root(), f"{name}-{key}")
    if os.path.isfile(os.path.join(out, "model_index.json")):
        return out
    tmp = f"{out}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        os.makedirs(tmp)
        arch.write_single_file_folder(path, header, tmp, vae=vae, config=config)
        if os.path.isdir(out):  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
            return out
        os.replace(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise LoraError(f"cannot write the converted model under {cache_root()}: {e.strerror or e}; set "
                        f"{CACHE_ENV} to a writable folder") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def model_folder(args) -> str:
    """The model folder of a run's ``--pretrained_model_name_or_path`` (with its ``--vae`` and ``--model_config``)."""
    return model_arg(args.pretrained_model_name_or_path, args)


def add_model_file_arguments(parser) -> None:
    """``--vae`` and ``--model_config``: what a single-file checkpoint given as the base model may need."""
    parser.add_argument("--vae", default=None, metavar="FILE",
                        help="a single-file checkpoint's VAE replaced by this .safetensors file (as kohya's --vae)")
    parser.add_argument("--model_config", default=None, metavar="FOLDER",
                        help="a single-file checkpoint's configs and tokenizers: a diffusers-layout folder of its "
                             "base model (its weights are not read)")


def model_arg(path: str | None, args) -> str | None:
    """:func:`resolve_model` of a command's model path with its :func:`add_model_file_arguments` options."""
    if not path:
        return path
    return resolve_model(path, getattr(args, "vae", None), getattr(args, "model_config", None))
