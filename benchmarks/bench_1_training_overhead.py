"""Benchmark 1 — plugin overhead in training.

The training step exactly as ``mindone-lora train`` builds and runs it (``Trainer`` set-up: models loaded from the
folder, adapters through the strategy hook, parameter groups through the hook, ``nn.AdamWeightDecay`` with the
scheduler's learning rates, ``DenoiseLoss`` + ``build_steps``) versus a minimal hand-written mindone LoRA loop doing
the same work: the same tiny SD1.x model folder and batch, ``unet.add_adapter(LoraConfig(...))`` with the same
targets, rank and alpha, ``ms.value_and_grad`` + gradient clipping + ``nn.AdamWeightDecay`` in one ``nn.Cell``,
GRAPH_MODE on CPU.

Judged: the median compiled step, plugin / hand-written, on the very same precomputed inputs (target ≤ 1.02).
Also reported: a whole loop iteration (VAE encode + text encode + host noise + step) for both, and time-to-first-step
(set-up + compile + first step) for both, each measured in a fresh process so neither profits from the other's
warm-up. Diagnosis row: the hand-written loss given the trainer's 7-input step signature (per-sample loss weights as
an extra input), which isolates what that signature costs.

    python benchmarks/bench_1_training_overhead.py [--reps N]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

BATCH = 2
RANK = 4
ALPHA = 4.0
TARGETS = "kohya"
LR = 1e-4
STEPS = 1000  # the learning-rate schedule's length (only its length matters here)
TARGET_RATIO = 1.02


# ---------------------------------------------------------------------------------------------------- shared set-up

def prepare(folder: str) -> dict:
    """The tiny SD1.x model folder and a captioned imagefolder (both built from code, nothing downloaded)."""
    from mindone_lora_plugin.runtime.process import setup

    setup("CPU", "graph", seed=0)
    from mindone_lora_plugin.architectures.sd.tiny import RESOLUTION, ensure_tiny_model
    from mindone_lora_plugin.demo.training import make_shapes_dataset

    model = ensure_tiny_model("sd1", os.path.join(folder, "tiny-sd1"))
    data = make_shapes_dataset(os.path.join(folder, "shapes"), size=RESOLUTION, repeats=1)
    return {"model": model, "data": data, "out": os.path.join(folder, "out"), "resolution": RESOLUTION}


def _import_everything() -> None:
    """Import what both sides use, so neither side's set-up time contains the other's imports."""
    from mindone_lora_plugin.runtime.process import quiet_mindone_imports, setup

    quiet_mindone_imports()
    setup("CPU", "graph", seed=0)
    import importlib

    for name in ("mindone.diffusers", "mindone.peft", "mindone.transformers", "transformers", "PIL.Image",
                 "mindone.diffusers.optimization", "mindone_lora_plugin.train.data.loader",
                 "mindone_lora_plugin.train.step",
                 "mindone_lora_plugin.train.trainer"):
        importlib.import_module(name)


# ---------------------------------------------------------------------------------------------------- the plugin side

def plugin_args(paths: dict):
    from mindone_lora_plugin.cli import COMMANDS, build_parser

    argv = ["train", "--pretrained_model_name_or_path", paths["model"], "--train_data_dir", paths["data"],
            "--output_dir", paths["out"], "--resolution", str(paths["resolution"]), "--train_batch_size", str(BATCH),
            "--max_train_steps", str(STEPS), "--learning_rate", str(LR), "--lr_scheduler", "constant",
            "--lr_warmup_steps", "0", "--lora_rank", str(RANK), "--lora_alpha", str(ALPHA),
            "--lora_targets", TARGETS, "--seed", "0", "--report_to", "none", "--device_target", "CPU",
            "--mode", "graph", "--checkpointing_steps", "0"]
    return build_parser({"train": COMMANDS["train"]}).parse_args(argv)


class PluginSide:
    """``Trainer(args).run()`` — everything ``mindone-lora train`` does before its loop — then its own step cell."""

    def __init__(self, paths: dict):
        from mindone_lora_plugin.train.trainer import Trainer

        class SetUpOnly(Trainer):
            def train_loop(self, start):  # stop where the training loop would begin
                return self

        self.trainer = SetUpOnly(plugin_args(paths)).run()
        self.targets = sorted(self.trainer.adapted["unet"])

    def inputs(self, micro: int = 0):
        """A loop iteration's inputs, made the way the trainer makes them (VAE encode, text encode, host noise)."""
        return self.trainer.micro_inputs(0, 0, micro)

    def step(self, inputs) -> float:
        return float(self.trainer.update_step(*inputs).asnumpy())

    def iteration(self, micro: int) -> float:
        return self.step(self.inputs(micro))


# ---------------------------------------------------------------------------------------------------- hand-written

class HandSide:
    """A minimal mindone LoRA loop written directly against mindone: no plugin code at all."""

    def __init__(self, paths: dict, targets: list[str]):
        import mindspore as ms
        import numpy as np
        from mindone.diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from mindone.diffusers.optimization import get_scheduler
        from mindone.peft import LoraConfig
        from mindone.transformers import CLIPTextModel
        from mindspore import nn, ops
        from PIL import Image
        from transformers import CLIPTokenizer

        folder = paths["model"]
        self.ms, self.np = ms, np
        self.unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
        self.vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
        self.text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")
        self.tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
        acp = DDPMScheduler.from_pretrained(folder, subfolder="scheduler").alphas_cumprod
        self.acp = np.asarray(acp.asnumpy() if hasattr(acp, "asnumpy") else acp, dtype=np.float64)
        for cell in (self.unet, self.vae, self.text_encoder):
            cell.set_train(False)
            for p in cell.get_parameters():
                p.requires_grad = False
        self.unet.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights="gaussian",
                                         target_modules=list(targets)))
        params = [p for p in self.unet.get_parameters() if p.requires_grad]
        lrs = [float(x) for x in get_scheduler("constant", LR, num_warmup_steps=0, num_training_steps=STEPS)]
        optimizer = nn.AdamWeightDecay(params, learning_rate=lrs + [lrs[-1]], beta1=0.9, beta2=0.999, eps=1e-8,
                                       weight_decay=1e-2)

        class Loss(nn.Cell):
            def __init__(self, unet):
                super().__init__()
                self.unet = unet

            def construct(self, latents, noise, timesteps, sqrt_acp, sqrt_1m_acp, embeds):
                noisy = sqrt_acp.reshape((-1, 1, 1, 1)) * latents + sqrt_1m_acp.reshape((-1, 1, 1, 1)) * noise
                pred = self.unet(noisy, timesteps, encoder_hidden_states=embeds, return_dict=False)[0]
                return ops.square(pred - noise).mean()

        class Step(nn.Cell):
            def __init__(self, loss, optimizer):
                super().__init__()
                self.grad_fn = ms.value_and_grad(loss, None, optimizer.parameters)
                self.optimizer = optimizer

            def construct(self, *inputs):
                loss, grads = self.grad_fn(*inputs)
                grads = ops.clip_by_global_norm(grads, 1.0)
                self.optimizer(grads)
                return loss

        class Encode(nn.Cell):
            def __init__(self, vae):
                super().__init__()
                self.vae = vae

            def construct(self, x):
                return self.vae.encode(x)[0]

        class TextEncode(nn.Cell):
            def __init__(self, text_encoder):
                super().__init__()
                self.text_encoder = text_encoder

            def construct(self, ids):
                return self.text_encoder(ids)[0]

        class LossTrainerSignature(Loss):
            """The same loss with the trainer's step signature (per-sample weights as an extra input; diagnostic
            variant, see ``add_signature_variant``)."""

            def construct(self, latents, noise, timesteps, sqrt_acp, sqrt_1m_acp, weights, embeds):
                return super().construct(latents, noise, timesteps, sqrt_acp, sqrt_1m_acp, embeds) * weights.mean()

        loss = Loss(self.unet)
        loss.set_train(True)
        self.train_step = Step(loss, optimizer)
        self._variant = (LossTrainerSignature, Step, params, lrs)
        self.encode = Encode(self.vae)
        self.text = TextEncode(self.text_encoder)
        # the first batch of the dataset, loaded the plain way
        import json

        rows = [json.loads(line) for line in open(os.path.join(paths["data"], "metadata.jsonl"), encoding="utf-8")]
        rows = rows[:BATCH]
        size = paths["resolution"]
        pixels = [np.asarray(Image.open(os.path.join(paths["data"], r["file_name"])).convert("RGB")
                             .resize((size, size)), dtype=np.float32) / 127.5 - 1.0 for r in rows]
        self.pixels = ms.Tensor(np.stack(pixels).transpose(0, 3, 1, 2))
        self.captions = [r["text"] for r in rows]
        self.scaling = self.vae.config.scaling_factor

    def add_signature_variant(self):
        """A second step cell over the same UNet and LoRA parameters (own optimizer state): the hand-written loss with
        the trainer's 7-input signature. Timing it isolates what the signature costs from everything else."""
        from mindspore import nn

        loss_cls, step_cls, params, lrs = self._variant
        optimizer = nn.AdamWeightDecay(params, learning_rate=lrs + [lrs[-1]], beta1=0.9, beta2=0.999, eps=1e-8,
                                       weight_decay=1e-2)
        loss = loss_cls(self.unet)
        loss.set_train(True)
        self.signature_step = step_cls(loss, optimizer)

    def step_signature(self, plugin_inputs) -> float:
        return float(self.signature_step(*plugin_inputs).asnumpy())

    def inputs(self, micro: int = 0):
        ms, np = self.ms, self.np
        rng = np.random.default_rng([0, micro])
        moments = self.encode(self.pixels).asnumpy()
        mean, logvar = np.split(moments, 2, axis=1)
        latents = (mean + np.exp(0.5 * np.clip(logvar, -30, 20)) * rng.standard_normal(mean.shape, dtype=np.float32))
        latents = latents * self.scaling
        noise = rng.standard_normal(latents.shape, dtype=np.float32)
        t = rng.integers(0, len(self.acp), size=latents.shape[0])
        ids = self.tokenizer(self.captions, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="np").input_ids.astype(np.int32)
        embeds = self.text(ms.Tensor(ids))
        f32 = ms.float32
        return (ms.Tensor(latents, f32), ms.Tensor(noise, f32), ms.Tensor(t.astype(np.int32)),
                ms.Tensor(np.sqrt(self.acp[t]).astype(np.float32)),
                ms.Tensor(np.sqrt(1.0 - self.acp[t]).astype(np.float32)), embeds)

    def step(self, inputs) -> float:
        return float(self.train_step(*inputs).asnumpy())

    def iteration(self, micro: int) -> float:
        return self.step(self.inputs(micro))


def hand_inputs_from(plugin_inputs):
    """The plugin's inputs as the hand-written step takes them (same tensors, its signature)."""
    latents, noise, t, a, s, _weights, embeds = plugin_inputs
    return (latents, noise, t, a, s, embeds)


# ---------------------------------------------------------------------------------------------------- fresh processes

def time_to_first_step(side: str, folder: str, targets: list[str]) -> dict:
    """In a fresh process: set-up, then the first step (inputs made from the dataset, compiles included)."""
    paths = prepare(folder)
    _import_everything()
    t0 = time.perf_counter()
    runner = PluginSide(paths) if side == "plugin" else HandSide(paths, targets)
    t1 = time.perf_counter()
    inputs = runner.inputs(0)
    t2 = time.perf_counter()
    loss = runner.step(inputs)
    t3 = time.perf_counter()
    return {"setup_s": t1 - t0, "first_inputs_s": t2 - t1, "first_step_s": t3 - t2, "total_s": t3 - t0, "loss": loss}


# ---------------------------------------------------------------------------------------------------- main

def _run(argv) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=40, help="interleaved repetitions of each side's step")
    ap.add_argument("--iter-reps", type=int, default=10, help="interleaved repetitions of a whole loop iteration")
    ap.add_argument("--no-ttfs", action="store_true", help="skip time-to-first-step (two fresh processes)")
    ap.add_argument("--no-diagnosis", action="store_true",
                    help="skip the hand-written step with the trainer's signature (one more compile)")
    args = ap.parse_args(argv)

    C.banner("Benchmark 1: plugin overhead in training (tiny SD1.x UNet, GRAPH_MODE, CPU)")
    C.print_machine()
    t_start = time.perf_counter()
    folder = C.workdir("train")
    paths = prepare(folder)
    _import_everything()
    print(f"batch {BATCH} × {paths['resolution']}px, LoRA rank {RANK} alpha {ALPHA} targets '{TARGETS}', "
          f"AdamWeightDecay + clip 1.0", flush=True)

    # both sides in this process: set-up and compile, then the interleaved steps
    plugin = PluginSide(paths)
    targets = plugin.targets
    hand = HandSide(paths, targets)
    from mindone_lora_plugin.models import lora_layers

    n_hand = sum(1 for _ in lora_layers(hand.unet))
    if n_hand != len(targets):
        raise AssertionError(f"the hand-written loop adapted {n_hand} modules, the plugin {len(targets)}")
    p_in = plugin.inputs(0)
    h_in = hand_inputs_from(p_in)
    fns = {"plugin": lambda: plugin.step(p_in), "hand": lambda: hand.step(h_in)}
    if not args.no_diagnosis:
        hand.add_signature_variant()
        fns["hand, trainer's signature"] = lambda: hand.step_signature(p_in)
    for _ in range(3):  # compile and warm up
        for fn in fns.values():
            fn()
    steps = C.interleave(fns, args.reps)
    med = {n: C.median(t) for n, t in steps.items()}
    sp, sh = med["plugin"], med["hand"]
    counter = iter(range(1, 1 << 30))
    for _ in range(2):
        plugin.iteration(0)
        hand.iteration(0)
    its = C.interleave({"plugin": lambda: plugin.iteration(next(counter)),
                        "hand": lambda: hand.iteration(next(counter))}, args.iter_reps)
    ip, ih = C.median(its["plugin"]), C.median(its["hand"])

    ttfs = {}
    if not args.no_ttfs:
        for side in ("hand", "plugin"):
            ttfs[side] = C.run_child("bench_1_training_overhead", "time_to_first_step", side, folder, targets)

    rows = [["compiled step (same inputs)", C.fmt_s(sp), C.fmt_s(sh), f"{sp / sh:.3f}", f"≤ {TARGET_RATIO}",
             C.verdict(sp / sh <= TARGET_RATIO)]]
    if "hand, trainer's signature" in med:
        sd = med["hand, trainer's signature"]
        rows.append(["diagnosis: hand-written step given the trainer's 7 inputs", C.fmt_s(sp), C.fmt_s(sd),
                     f"{sp / sd:.3f}", "—", "context"])
    rows.append(["loop iteration (VAE + text encode, noise, step)", C.fmt_s(ip), C.fmt_s(ih), f"{ip / ih:.3f}", "—",
                 "context"])
    for key, label in (("setup_s", "set-up (load, adapters, optimizer, cells)"),
                       ("first_inputs_s", "first inputs (VAE + text encoder compile + run)"),
                       ("first_step_s", "first training step (compile + run)"),
                       ("total_s", "time to first step")):
        if ttfs:
            a, b = ttfs["plugin"][key], ttfs["hand"][key]
            rows.append([label, C.fmt_s(a), C.fmt_s(b), f"{a / b:.2f}", "—", "context (1 run)"])
    print()
    C.print_table(["measure", "mindone-lora train", "hand-written", "ratio", "target", "result"], rows)
    print(f"\nstep: medians of {args.reps} interleaved repetitions each (min plugin {C.fmt_s(min(steps['plugin']))}, "
          f"hand {C.fmt_s(min(steps['hand']))}); loop iteration: {args.iter_reps} each; time to first step: one fresh "
          f"process per side", flush=True)
    if "hand, trainer's signature" in med:
        sd = med["hand, trainer's signature"]
        print(f"diagnosis: the hand-written step fed the trainer's 7 inputs (with per-sample loss weights) takes "
              f"{C.fmt_s(sd)} = {sd / sh:.3f}× the 6-input hand-written step; the plugin step is {sp / sd:.3f}× it")
    print(f"RATIO step plugin/hand = {sp / sh:.3f} (target ≤ {TARGET_RATIO}): {C.verdict(sp / sh <= TARGET_RATIO)}")
    print(f"benchmark 1 took {time.perf_counter() - t_start:.0f} s", flush=True)
    C.save_results("bench_1", {"steps": steps, "iterations": its, "ttfs": ttfs, "machine": C.machine()})
    return 0


def main(argv=None) -> int:
    return C.run_main(_run, argv)


if __name__ == "__main__":
    sys.exit(main())
