"""``mindone-lora merge``: fuse LoRAs into a model folder, or combine them into one LoRA file.

* ``merge --model MODEL_DIR --lora FILE[:WEIGHT] ... --out MODEL_OUT [--dtype {fp32,fp16,bf16}] [--overwrite]``
  writes a full diffusers-layout folder whose UNet and text-encoder weights are ``W + sum(weight * delta)``; the rest
  (VAE, tokenizers, scheduler, configs) is copied. It loads with ``from_pretrained``. Pure numpy, one tensor at a time;
  the folder is written under a temporary name and renamed into place. ``--model`` may be a single-file checkpoint;
  ``--out FILE.safetensors`` then writes the merged model as one file in that checkpoint's own layout (fp16 unless
  ``--save_dtype``/``--dtype``), streamed (:mod:`mindone_lora_plugin.compose.single_file`).
* ``merge --to-lora --lora FILE[:WEIGHT] ... --out FILE [--format {kohya,diffusers}] [--model MODEL_DIR]`` writes one
  LoRA equal to the weighted LoRAs together: ranks are concatenated, each LoRA's weight and scale folded into its up
  matrices (exact, no SVD; plain LoRA only). With ``--rank N`` (needed for LoHa/LoKr/DoRA) the merged weight changes
  are reduced to a rank-N plain LoRA by SVD, as kohya's ``svd_merge_lora.py`` does, and the relative error is printed;
  DoRA modules also need ``--model`` (their change depends on the base weights, read one tensor at a time). The format
  is ``--format``, else diffusers for a folder, kohya for a ``.safetensors`` file.
"""

from __future__ import annotations

from mindone_lora_plugin.dtypes import SAVE_DTYPES as DTYPE_CHOICES
from mindone_lora_plugin.errors import LoraError
from mindone_lora_plugin.model_files import add_model_file_arguments, model_arg


def add_parser(subparsers):
    p = subparsers.add_parser(
        "merge", help="fuse LoRAs into a model folder, or combine them into one LoRA",
        description="Fuse weighted LoRAs into the UNet and text encoders of a diffusers-layout model folder, or "
                    "(--to-lora) combine them into one LoRA file by concatenating ranks.")
    p.add_argument("--model", default=None, metavar="MODEL",
                   help="the base model folder (diffusers layout) or single-file checkpoint; required unless "
                        "--to-lora, where it checks the LoRAs against it (and gives DoRA modules the base weights "
                        "they need with --rank)")
    add_model_file_arguments(p)
    p.add_argument("--lora", action="append", default=[], required=True, metavar="FILE[:WEIGHT]",
                   help="a LoRA file or folder with an optional weight after the last colon (default 1; may be "
                        "negative). Repeat for several LoRAs")
    p.add_argument("--out", required=True,
                   help="the model folder to write, or a .safetensors file (a single-file --model merged in its own "
                        "layout, what A1111/ComfyUI load); with --to-lora, the LoRA file")
    p.add_argument("--dtype", "--save_dtype", dest="dtype", choices=DTYPE_CHOICES, default=None,
                   help="cast the written weights (default: keep the model's dtype; a single file: fp16; a combined "
                        "LoRA: fp32)")
    p.add_argument("--to-lora", dest="to_lora", action="store_true",
                   help="write one LoRA file combining the LoRAs instead of a model folder")
    p.add_argument("--format", default=None,
                   help="with --to-lora: the LoRA format (kohya, diffusers or a plugin's; default: kohya for a "
                        ".safetensors file, diffusers for a folder)")
    p.add_argument("--rank", type=int, default=None,
                   help="with --to-lora: reduce the merged weight changes to a plain LoRA of this rank by SVD (as "
                        "kohya's svd_merge_lora.py; needed for LoHa/LoKr/DoRA, whose sums are no LoRA; DoRA also needs "
                        "--model); prints the relative approximation error")
    p.add_argument("--overwrite", action="store_true", help="replace --out when it exists")
    return p


def run(args) -> int:
    from mindone_lora_plugin import compose
    from mindone_lora_plugin.base_model_info import BaseModelInfo

    if args.rank is not None and not args.to_lora:
        raise LoraError("--rank only applies with --to-lora (it sets the rank of the combined LoRA)")
    if args.format and not args.to_lora:
        raise LoraError("--format only applies with --to-lora (a merged model is a diffusers folder)")
    if not args.to_lora and not args.model:
        raise LoraError("--model MODEL_DIR is required to merge LoRAs into a model (or pass --to-lora)")
    folder = model_arg(args.model, args)
    info = BaseModelInfo.from_folder(folder) if folder else None
    if not args.to_lora and args.out.lower().endswith(".safetensors"):
        return _merge_single_file(args, folder, info)
    if not args.to_lora:
        if compose.output_is_taken(args.out) and not args.overwrite:
            raise LoraError(f"the output folder {args.out} already exists; choose another --out or pass --overwrite "
                            f"to replace it")
        loras = compose.load_loras(args.lora, base=info)
        out = compose.merge_into_folder(folder, loras, args.out, dtype=args.dtype, overwrite=args.overwrite)
        print(f"wrote {out}: {info.architecture} model with {_describe(loras)} fused into "
              f"{', '.join(sorted({c for lo in loras for c in lo.state.components}))}"
              f"{f' ({args.dtype})' if args.dtype else ''}")
        return 0
    fmt = compose.pick_format(args.out, args.format)
    loras = compose.load_loras(args.lora, base=info)
    if args.rank is not None:
        bases = compose.FolderWeights(folder) if folder else None  # DoRA's change needs the base weights
        state, error = compose.svd_reduce(loras, args.rank, base_weights=bases)
        how = f"reduced by SVD to rank {args.rank} (relative approximation error {error:.3e})"
    else:
        state = compose.concat_loras(loras)
        how = "concatenated exactly"
    written = compose.write_lora(state, args.out, format=fmt.name, dtype=args.dtype, overwrite=args.overwrite)
    ranks = sorted({m.rank for _, _, m in state.modules()})
    print(f"wrote {written} ({fmt.name}): {_describe(loras)} combined into one LoRA of {len(state)} modules "
          f"(ranks {ranks[0]}-{ranks[-1]}), {how}")
    return 0


def _describe(loras) -> str:
    return ", ".join(f"{lo.name}×{lo.weight:g}" for lo in loras)


def _merge_single_file(args, folder, info) -> int:
    import os

    from mindone_lora_plugin import compose
    from mindone_lora_plugin.compose.single_file import merge_into_file

    if not args.model or os.path.isdir(args.model):
        raise LoraError(f"--out {args.out} is a single file, written in the layout of a single-file --model; with a "
                        "model folder, give --out a folder (the merged diffusers-layout model)")
    if args.vae:
        raise LoraError("--vae does not apply to a single-file merge: the merged file keeps the checkpoint's VAE")
    loras = compose.load_loras(args.lora, base=info)
    dtype = args.dtype or "fp16"
    out = merge_into_file(args.model, loras, args.out, dtype=dtype, overwrite=args.overwrite,
                          config=args.model_config)
    print(f"wrote {out}: single-file {info.architecture} checkpoint with {_describe(loras)} fused into "
          f"{', '.join(sorted({c for lo in loras for c in lo.state.components}))} ({dtype})")
    return 0
