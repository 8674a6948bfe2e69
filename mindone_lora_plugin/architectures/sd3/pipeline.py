"""Generation with mindone's ``StableDiffusion3Pipeline``: from a model folder (``generate``) or from a training
run's live modules (validation images); ``generate`` and validation call it as any mindone pipeline."""

from __future__ import annotations


def load_pipeline(folder: str, dtype=None):
    """``StableDiffusion3Pipeline.from_pretrained(folder)`` (``dtype``: a MindSpore dtype for the weights, or None)."""
    from mindone_lora_plugin.runtime.process import quiet_mindone_imports

    quiet_mindone_imports()
    from mindone.diffusers import StableDiffusion3Pipeline

    kw = {"mindspore_dtype": dtype} if dtype is not None else {}
    return StableDiffusion3Pipeline.from_pretrained(folder, **kw)


def live_pipeline(models: dict, vae, tokenizers, scheduler):
    """A ``StableDiffusion3Pipeline`` around already-loaded modules (a training run's, LoRA layers active)."""
    from mindone.diffusers import StableDiffusion3Pipeline

    toks = tuple(tokenizers) + (None,) * (3 - len(tokenizers))
    return StableDiffusion3Pipeline(transformer=models["transformer"], scheduler=scheduler, vae=vae,
                                    text_encoder=models["text_encoder"], tokenizer=toks[0],
                                    text_encoder_2=models["text_encoder_2"], tokenizer_2=toks[1],
                                    text_encoder_3=models.get("text_encoder_3"), tokenizer_3=toks[2])

