"""Benchmark 4 — the CPU training step versus the PyTorch reference.

The tiny SD1.x UNet (``mindone_lora_plugin.tiny.SD1_UNET``) with LoRA on the ``kohya`` preset (rank 4, alpha 4,
gaussian init), batch 2 of 4×16×16 latents with 77-token text embeddings, loss = per-sample-weighted MSE of the noise
prediction, gradient clipping at 1.0, AdamW (β 0.9/0.999, ε 1e-8, weight decay 1e-2, lr 1e-4):

* MindSpore 2.7.1 + mindone 0.5.0, GRAPH_MODE on CPU with this package's CPU backend, the step built the way
  ``mindone-lora train`` builds it (adapters and parameter groups through the plugin hooks, ``nn.AdamWeightDecay``,
  ``DenoiseLoss`` + ``build_steps``);
* torch (CPU, default thread count) + Hugging Face diffusers ``UNet2DConditionModel(**same config)`` + peft
  ``LoraConfig`` via ``unet.add_adapter`` with the same target modules, ``torch.optim.AdamW``.

Each framework runs in its own process (neither library's threads or allocator can disturb the other); the steps
alternate (MS, torch, torch, MS, ...), each timed inside its process including the host sync. torch runs twice: at
its default thread count, and with one thread (on a busy 2-core machine its default OpenMP threads can stall for
seconds at barriers). Judged: median step MindSpore / the faster torch configuration (target ≤ 3). Needs the
``interop`` extra; without it the benchmark says so and exits 0.

    python benchmarks/bench_4_vs_torch.py [--reps N]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

BATCH = 2
LATENT = 16
TOKENS = 77
RANK = 4
ALPHA = 4.0
LR = 1e-4
TARGET_RATIO = 3.0


def batch(cross_dim: int, seed: int = 0) -> dict:
    """The same inputs for both frameworks (numpy, fixed seed)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
    acp = np.cumprod(1.0 - betas)
    t = rng.integers(0, 1000, size=BATCH)
    return {"latents": rng.standard_normal((BATCH, 4, LATENT, LATENT), dtype=np.float32),
            "noise": rng.standard_normal((BATCH, 4, LATENT, LATENT), dtype=np.float32),
            "t": t.astype(np.int32),
            "a": np.sqrt(acp[t]).astype(np.float32), "s": np.sqrt(1.0 - acp[t]).astype(np.float32),
            "weights": np.ones(BATCH, dtype=np.float32),
            "embeds": rng.standard_normal((BATCH, TOKENS, cross_dim), dtype=np.float32),
            "time_ids": np.zeros((BATCH, 6), dtype=np.float32)}  # SDXL only; the SD1.x step ignores them


class MindSporeStep:
    """The plugin's training step on the tiny UNet, GRAPH_MODE, CPU backend."""

    def __init__(self):
        from mindone_lora_plugin.runtime import setup

        setup("CPU", "graph", seed=0)
        import mindspore as ms
        from mindspore import nn
        from mindone.diffusers import UNet2DConditionModel

        from mindone_lora_plugin.models import Models
        from mindone_lora_plugin.options import LoraOptions
        from mindone_lora_plugin.plugins import get_plugin_manager
        from mindone_lora_plugin.tiny import SD1_UNET
        from mindone_lora_plugin.train.step import DenoiseLoss, TextConditioner, build_steps

        unet = UNet2DConditionModel(**SD1_UNET)
        unet.set_train(False)
        models = Models(unet=unet, architecture="sd1")
        options = LoraOptions(strategy="unet", rank=RANK, alpha=ALPHA, targets="kohya", init="gaussian",
                              learning_rate=LR)
        pm = get_plugin_manager()
        self.adapted = pm.add_adapters(models, options)["unet"]
        groups = pm.trainable_parameters(models, options)
        lrs = [LR] * 1001
        optimizer = nn.AdamWeightDecay([{"params": g["params"], "lr": lrs, "weight_decay": 1e-2} for g in groups],
                                       learning_rate=lrs, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2)
        loss = DenoiseLoss(unet, TextConditioner(None), False, False, False)
        loss.set_train(True)
        _, self.train_step = build_steps(loss, optimizer, 1.0, 1)
        b = batch(SD1_UNET["cross_attention_dim"])
        f32 = ms.float32
        self.inputs = (ms.Tensor(b["latents"]), ms.Tensor(b["noise"]), ms.Tensor(b["t"]), ms.Tensor(b["a"]),
                       ms.Tensor(b["s"]), ms.Tensor(b["weights"]), ms.Tensor(b["embeds"]),
                       ms.Tensor(b["embeds"][:, 0]), ms.Tensor(b["time_ids"], f32))
        self.trainable = sum(int(p.size) for g in groups for p in g["params"])
        t0 = time.perf_counter()
        self.first_loss = self._run()
        self.first_step_s = time.perf_counter() - t0

    def _run(self) -> float:
        return float(self.train_step(*self.inputs).asnumpy())

    def step(self) -> None:
        self._run()

    def info(self) -> dict:
        return {"modules": sorted(self.adapted), "trainable": self.trainable, "first_step_s": self.first_step_s,
                "loss": self.first_loss}


class TorchStep:
    """torch + Hugging Face diffusers + peft, the same model, targets, batch and update."""

    def __init__(self, targets, threads=None):
        import torch
        from diffusers import UNet2DConditionModel
        from peft import LoraConfig

        from mindone_lora_plugin.tiny import SD1_UNET

        if threads:
            torch.set_num_threads(int(threads))
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**SD1_UNET)
        unet.requires_grad_(False)
        unet.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights="gaussian",
                                    target_modules=list(targets)))
        unet.train()
        self.params = [p for p in unet.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
        self.unet, self.torch = unet, torch
        b = batch(SD1_UNET["cross_attention_dim"])
        self.b = {k: torch.from_numpy(v) for k, v in b.items() if k != "time_ids"}
        self.b["t"] = self.b["t"].long()
        self.adapted = sorted(n.rsplit(".lora_A", 1)[0] for n, _ in unet.named_modules() if n.endswith(".lora_A"))
        t0 = time.perf_counter()
        self.first_loss = self._run()
        self.first_step_s = time.perf_counter() - t0

    def _run(self) -> float:
        return C.torch_lora_step(self.torch, self.unet, self.b, self.params, self.optimizer)

    def step(self) -> None:
        self._run()

    def info(self) -> dict:
        return {"modules": self.adapted, "trainable": sum(p.numel() for p in self.params),
                "first_step_s": self.first_step_s, "loss": self.first_loss,
                "threads": self.torch.get_num_threads()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=40, help="interleaved steps per configuration")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per configuration after the first")
    ap.add_argument("--default-threads-budget", type=float, default=60.0,
                    help="seconds of torch steps at the default thread count after which that configuration stops "
                         "being sampled (on a busy machine its steps can take seconds)")
    args = ap.parse_args(argv)

    C.banner("Benchmark 4: CPU training step vs the PyTorch reference (tiny SD1.x UNet, LoRA kohya preset)")
    C.print_machine()
    if not C.have_interop():
        print("SKIPPED: the interop extra (torch, diffusers, peft) is not installed: pip install -e '.[interop]'")
        return 0
    t_start = time.perf_counter()
    workers = {}
    try:
        workers["mindspore"] = C.Worker("bench_4_vs_torch", "MindSporeStep")
        targets = workers["mindspore"].info["modules"]
        workers["torch"] = C.Worker("bench_4_vs_torch", "TorchStep", targets)
        workers["torch 1 thread"] = C.Worker("bench_4_vs_torch", "TorchStep", targets, 1)
        for name in ("torch", "torch 1 thread"):
            info, ref = workers[name].info, workers["mindspore"].info
            if sorted(info["modules"]) != sorted(targets) or info["trainable"] != ref["trainable"]:
                raise AssertionError(f"{name} adapted {len(info['modules'])} modules / {info['trainable']} "
                                     f"parameters, MindSpore {len(targets)} / {ref['trainable']}")
        for _ in range(args.warmup):
            for w in workers.values():
                w.step()
        names = list(workers)
        times = {n: [] for n in names}
        for r in range(args.reps):
            for n in (names if r % 2 == 0 else names[::-1]):
                if n == "torch" and sum(times[n]) > args.default_threads_budget:
                    continue
                times[n].append(workers[n].step())
    finally:
        for w in workers.values():
            w.close()
    info = {n: w.info for n, w in workers.items()}
    med = {n: C.median(t) for n, t in times.items()}
    ms_s = med["mindspore"]
    best = min(("torch", "torch 1 thread"), key=lambda n: med[n])
    ratio = ms_s / med[best]
    print(f"batch {BATCH} × 4×{LATENT}×{LATENT} latents, {len(targets)} LoRA modules, "
          f"{info['mindspore']['trainable']:,} trainable parameters; torch default threads "
          f"{info['torch']['threads']}\n")
    rows = [["MindSpore GRAPH_MODE (CPU backend)", C.fmt_s(ms_s), C.fmt_s(min(times["mindspore"])),
             C.fmt_s(info["mindspore"]["first_step_s"]), len(times["mindspore"]), "1.00"]]
    for n, label in (("torch", f"torch + diffusers + peft ({info['torch']['threads']} threads, default)"),
                     ("torch 1 thread", "torch + diffusers + peft (1 thread)")):
        rows.append([label, C.fmt_s(med[n]), C.fmt_s(min(times[n])), C.fmt_s(info[n]["first_step_s"]),
                     len(times[n]), f"{ms_s / med[n]:.2f}"])
    C.print_table(["tiny UNet LoRA step", "median", "min", "first step", "steps timed", "MindSpore ÷ this"], rows)
    print(f"\nsteps interleaved (each configuration in its own process, one at a time), after {args.warmup} warm-up "
          f"steps each. Judged against the faster torch configuration ({best}): on a busy 2-core machine torch's "
          f"default OpenMP threads can stall for seconds at barriers, which would flatter MindSpore.")
    print(f"RATIO step mindspore/torch = {ratio:.2f} (vs {best}; target ≤ {TARGET_RATIO:g}): "
          f"{C.verdict(ratio <= TARGET_RATIO)}")
    print(f"benchmark 4 took {time.perf_counter() - t_start:.0f} s", flush=True)
    C.save_results("bench_4", {"times": times, "info": info, "machine": C.machine()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
