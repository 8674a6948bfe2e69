"""Measure what a shapes model draws: fast DDIM sampling (compiled once) and the colour-and-shape scores.

    python -m mindone_lora_plugin.demo.shapes_eval [MODEL_DIR] [--lora FILE[:WEIGHT]] [--seeds 8]

prints, for each of the 12 base prompts (or ``--prompt``), how many of the seeds draw the asked colour and shape
(:mod:`mindone_lora_plugin.demo.shapes`). The UNet and the VAE decoder run as GRAPH_MODE cells with fixed shapes, so
sampling 8 images × 20 steps costs a fraction of a second per step on a CPU once compiled; the pipeline's PyNative
path would take minutes for the same images. Image ``i`` starts from the noise of seed ``i`` (a numpy generator).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass

import numpy as np

from mindone_lora_plugin.demo import shapes

STEPS = 20
GUIDANCE = 5.0


def shipped_model() -> str:
    """The folder of the pretrained shapes base model shipped with the package."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "shapes-sd1")


class Sampler:
    """Classifier-free-guided DDIM sampling of a fixed batch of seeds with one UNet, VAE and text encoder.

    Weights may change between calls (``Parameter.set_data``, e.g. merging a LoRA at another weight): the compiled
    cells read them at every call, so nothing recompiles.
    """

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler_config, resolution: int, batch: int = 8,
                 steps: int = STEPS, guidance: float = GUIDANCE):
        import mindspore as ms
        from mindone.diffusers import DDIMScheduler
        from mindspore import nn

        class _Unet(nn.Cell):
            def __init__(self, u):
                super().__init__()
                self.u = u

            def construct(self, x, t, emb):
                return self.u(x, t, encoder_hidden_states=emb, return_dict=False)[0]

        class _Decode(nn.Cell):
            def __init__(self, v):
                super().__init__()
                self.v = v

            def construct(self, z):
                return self.v.decode(z)[0]

        self.ms = ms
        self.unet_cell, self.decode_cell = _Unet(unet), _Decode(vae)
        self.unet_cell.set_train(False)
        self.decode_cell.set_train(False)
        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        self.batch, self.guidance = batch, float(guidance)
        scheduler = DDIMScheduler.from_config(scheduler_config)
        scheduler.set_timesteps(steps)
        as_np = lambda v: np.asarray(v.asnumpy() if hasattr(v, "asnumpy") else v, np.float64)  # noqa: E731
        self.timesteps = as_np(scheduler.timesteps).astype(np.int64)
        self.acp = as_np(scheduler.alphas_cumprod)
        self.final_acp = float(as_np(scheduler.final_alpha_cumprod))
        self.stride = scheduler.config.num_train_timesteps // steps
        self.v_prediction = scheduler.config.prediction_type == "v_prediction"
        self.latent_shape = (unet.config.in_channels, resolution // 2 ** (len(vae.config.block_out_channels) - 1),
                             resolution // 2 ** (len(vae.config.block_out_channels) - 1))
        self._embeds: dict[str, np.ndarray] = {}

    @classmethod
    def from_folder(cls, model_dir: str, **kwargs) -> "Sampler":
        from mindone.diffusers import AutoencoderKL, UNet2DConditionModel
        from mindone.transformers import CLIPTextModel
        from transformers import CLIPTokenizer

        unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
        vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae")
        text_encoder = CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder")
        tokenizer = CLIPTokenizer.from_pretrained(model_dir, subfolder="tokenizer")
        from mindone.diffusers import DDIMScheduler

        config = DDIMScheduler.load_config(model_dir, subfolder="scheduler")
        return cls(unet, vae, text_encoder, tokenizer, config, vae.config.sample_size, **kwargs)

    def embed(self, prompt: str) -> np.ndarray:
        """The text encoder's last hidden state for ``prompt`` (cached; computed in PyNative)."""
        if prompt not in self._embeds:
            ms = self.ms
            ids = self.tokenizer([prompt], padding="max_length", max_length=self.tokenizer.model_max_length,
                                 truncation=True, return_tensors="np").input_ids.astype(np.int32)
            mode = ms.get_context("mode")
            ms.set_context(mode=ms.PYNATIVE_MODE)
            try:
                self._embeds[prompt] = self.text_encoder(ms.Tensor(ids))[0].asnumpy()[0]
            finally:
                ms.set_context(mode=mode)
        return self._embeds[prompt]

    def clear_text_cache(self) -> None:
        """Forget cached prompt embeddings (call after changing the text encoder's weights)."""
        self._embeds.clear()

    def sample(self, prompt: str, seeds) -> list:
        """PIL images of ``prompt``, one per seed (``batch`` at a time)."""
        seeds = list(seeds)
        out = []
        for start in range(0, len(seeds), self.batch):
            out.extend(self._sample_batch(prompt, seeds[start:start + self.batch]))
        return out

    def _sample_batch(self, prompt: str, seeds: list[int]) -> list:
        from PIL import Image

        ms = self.ms
        n = len(seeds)
        pad = self.batch - n  # always run the compiled batch size
        x = np.stack([np.random.default_rng(s).standard_normal(self.latent_shape) for s in seeds]
                     + [np.zeros(self.latent_shape)] * pad)
        emb = np.stack([self.embed("")] * self.batch + [self.embed(prompt)] * self.batch).astype(np.float32)
        emb_t = ms.Tensor(emb)
        for t in self.timesteps:
            tt = ms.Tensor(np.full(2 * self.batch, t, np.int32))
            xin = ms.Tensor(np.concatenate([x, x]).astype(np.float32))
            out = self.unet_cell(xin, tt, emb_t).asnumpy().astype(np.float64)
            out = out[self.batch:] * self.guidance + out[:self.batch] * (1.0 - self.guidance)
            a_t = self.acp[t]
            prev = t - self.stride
            a_prev = self.acp[prev] if prev >= 0 else self.final_acp
            if self.v_prediction:
                x0 = np.sqrt(a_t) * x - np.sqrt(1 - a_t) * out
                eps = np.sqrt(a_t) * out + np.sqrt(1 - a_t) * x
            else:
                eps = out
                x0 = (x - np.sqrt(1 - a_t) * eps) / np.sqrt(a_t)
            x = np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev) * eps
        z = ms.Tensor((x / self.vae.config.scaling_factor).astype(np.float32))
        pixels = self.decode_cell(z).asnumpy()[:n]
        arr = np.clip((pixels.transpose(0, 2, 3, 1) + 1) * 127.5 + 0.5, 0, 255).astype(np.uint8)
        return [Image.fromarray(a) for a in arr]


@dataclass
class PromptScore:
    prompt: str
    hits: int
    total: int
    readings: list  # (colour, shape) per image
    images: list

    @property
    def rate(self) -> float:
        return self.hits / max(1, self.total)


def score_prompt(sampler: Sampler, prompt: str, seeds=range(8), want=None) -> PromptScore:
    """Sample ``prompt`` for ``seeds`` and count the images that show what is wanted: the colour and shape the prompt
    names, or ``want`` — a ``(colour, shape)`` pair, or a predicate on an image's ``(colour, shape)`` reading."""
    if want is None:
        want = shapes.asked(prompt)
    ok = want if callable(want) else (lambda reading: reading == tuple(want))
    images = sampler.sample(prompt, seeds)
    readings = [shapes.classify(im) for im in images]
    return PromptScore(prompt, sum(bool(ok(r)) for r in readings), len(images), readings, images)


def is_base_figure(reading) -> bool:
    """True for a reading that is one of the base model's colours and shapes (any of the 12 classes)."""
    return reading[0] in shapes.COLOURS and reading[1] in shapes.SHAPES


def score_base(sampler: Sampler, prompts=shapes.BASE_PROMPTS, seeds=range(8)) -> list[PromptScore]:
    return [score_prompt(sampler, p, seeds) for p in prompts]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mindone_lora_plugin.demo.shapes_eval",
                                description="Score a shapes model: how often it draws the asked colour and shape.")
    p.add_argument("model", nargs="?", default=None, help="model folder (default: the shipped shapes base)")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:WEIGHT]", help="LoRAs to fuse in first")
    p.add_argument("--prompt", action="append", default=None, help="prompts (default: the 12 base prompts)")
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--guidance_scale", type=float, default=GUIDANCE)
    p.add_argument("--grid", default=None, help="also write the images as one PNG grid (a row per prompt)")
    a = p.parse_args(argv)
    from mindone_lora_plugin.runtime.process import setup

    setup("CPU", "graph", 0)
    model = a.model or shipped_model()
    sampler = Sampler.from_folder(model, batch=min(8, a.seeds), steps=a.steps, guidance=a.guidance_scale)
    if a.lora:
        from mindone_lora_plugin import compose
        from mindone_lora_plugin.models import Models

        compose.merge_into_models(Models(unet=sampler.unet, text_encoder=sampler.text_encoder),
                                  compose.load_loras(a.lora, base=model))
    results = [score_prompt(sampler, pr, range(a.seeds)) for pr in (a.prompt or shapes.BASE_PROMPTS)]
    for r in results:
        seen = ", ".join(f"{c or '-'} {s or '-'}" for c, s in r.readings)
        print(f"{r.prompt:24s} {r.hits}/{r.total}  {seen}")
    hits, total = sum(r.hits for r in results), sum(r.total for r in results)
    print(f"overall: {hits}/{total} = {100.0 * hits / max(1, total):.1f}%")
    if a.grid:
        from mindone_lora_plugin.train.visuals import save_rows

        save_rows([(r.prompt, r.images) for r in results], a.grid)
        print(f"wrote {a.grid}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
