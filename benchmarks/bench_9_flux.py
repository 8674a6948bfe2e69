"""Benchmark 9 — FLUX.1: the tiny FLUX LoRA step vs torch, and injection on a full-size FLUX.1-dev transformer.

**Part 1, the training step** (context for the CPU backend, no target). The tiny FLUX.1-dev-layout transformer of
``mindone_lora_plugin.architectures.flux.tiny`` (1 double + 2 single blocks, guidance embedding), saved once as a
diffusers folder so both frameworks load the *same* weights; LoRA on the ``attn`` preset (attention projections, 14
modules), rank 4, alpha 4, gaussian init; batch 2 of 16×16×16 latents (64 packed tokens), 32 T5 tokens, the same
latents, noise, sigmas (``sigma`` sampling, shift 3) and guidance 3.5; flow-matching loss (target ``ε − x₀``,
per-sample weights), clipping at 1.0, AdamW (β 0.9/0.999, ε 1e-8, weight decay 1e-2, lr 1e-4):

* MindSpore 2.7.1 + mindone 0.5.0, GRAPH_MODE on CPU with this package's CPU backend; adapters and parameter groups
  through the plugin hooks (``flux`` strategy), ``FlowMatchLoss`` + ``build_steps``, ``nn.AdamWeightDecay``;
* torch (CPU) + Hugging Face diffusers ``FluxTransformer2DModel.from_pretrained(folder)`` + peft ``LoraConfig`` via
  ``add_adapter`` with the same module list, the same loss written in torch, ``torch.optim.AdamW``; at the default
  thread count and with one thread.

Each configuration lives in its own process; steps alternate and only one process works at a time. With ``lora_B``
at zero the first loss is the base model's, so both frameworks must report the same first loss (checked).

**Part 2, injection at full size** (target ≤ 1.05). A FLUX.1-dev transformer from its published config
(``_configs.FLUX1_DEV_TRANSFORMER``, 11.9B parameters) built inside MindSpore's ``nn.utils.no_init_parameters()``:
the parameters keep their shapes and initialisers but no memory (1008 of the 1160 tensors — all Linear weights and
biases — stay unallocated; only norm weights are materialised), so the model fits in a few MiB. Side A adds the
preset through the strategy hook (``get_plugin_manager().add_adapters(models, options)``, what ``mindone-lora
train`` calls: target selection, freezing, ``LoraConfig`` with per-module patterns, ``add_adapter``, listing);
side B calls mindone's ``transformer.add_adapter(mindone.peft.LoraConfig(...))`` with the same target list, rank 16,
alpha 16, gaussian init. Both presets: ``attn`` (266 modules) and ``kohya`` (every Linear of the double and single
blocks, 494 modules). **Every injection runs in a fresh process** (imports, plugin loading and the lazy model
build untimed), sides alternating A B B A ..., so each one adapts an untouched model. Checked after each: the
adapted modules equal the config-derived list (``_configs.flux_preset_shapes``), every ``lora_A``/``lora_B`` has
the shape ``(r, in)``/``(out, r)`` of its base Linear, the LoRA weights are allocated and the base weights are still
unallocated. Peak RSS is the high-water mark during the injection above the RSS just before it.

    python benchmarks/bench_9_flux.py [--reps N] [--inject-reps N] [--only step|inject] [--presets attn kohya]
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
TOKENS = 32
RANK = 4
ALPHA = 4.0
LR = 1e-4
GUIDANCE = 3.5
INJECT_RANK = 16
INJECT_ALPHA = 16.0
TARGET_RATIO = 1.05


# ---------------------------------------------------------------------------------------------------- part 1: step

def make_folder(folder: str) -> str:
    """Save the tiny dev-layout FLUX pipeline at ``folder`` (run in a child process)."""
    from mindone_lora_plugin.runtime.process import setup

    setup("CPU", "pynative", seed=0)
    from mindone_lora_plugin.architectures.flux.tiny import ensure_tiny_model

    return ensure_tiny_model("dev", folder)


def batch(seed: int = 0) -> dict:
    """The same inputs for both frameworks (numpy, fixed seed)."""
    import numpy as np

    from mindone_lora_plugin.architectures.flux import timesteps as ts

    rng = np.random.default_rng(seed)
    return {"latents": rng.standard_normal((BATCH, 16, LATENT, LATENT), dtype=np.float32),
            "noise": rng.standard_normal((BATCH, 16, LATENT, LATENT), dtype=np.float32),
            "sigmas": np.asarray(ts.sample_sigmas(rng, BATCH, "sigma", 3.0), np.float32),
            "weights": np.ones(BATCH, dtype=np.float32),
            "embeds": rng.standard_normal((BATCH, TOKENS, 32), dtype=np.float32),
            "pooled": rng.standard_normal((BATCH, 32), dtype=np.float32),
            "guidance": np.full(BATCH, GUIDANCE, np.float32)}


class MindSporeStep(C.MindSporeLoraStep):
    """The plugin's FLUX LoRA step on the tiny transformer, GRAPH_MODE, CPU backend."""

    def __init__(self, folder):
        from mindone_lora_plugin.runtime.process import setup

        setup("CPU", "graph", seed=0)
        import mindspore as ms
        from mindone.diffusers import FluxTransformer2DModel

        from mindone_lora_plugin.architectures.flux.loss import FlowMatchLoss
        from mindone_lora_plugin.models import Models
        from mindone_lora_plugin.options import LoraOptions

        model = FluxTransformer2DModel.from_pretrained(folder, subfolder="transformer")
        model.set_train(False)
        options = LoraOptions(strategy="flux", architecture="flux", rank=RANK, alpha=ALPHA, targets="attn",
                              init="gaussian", learning_rate=LR)
        b = batch()
        inputs = [ms.Tensor(b[k]) for k in ("latents", "noise", "sigmas", "weights", "embeds", "pooled", "guidance")]
        self._build(Models(transformer=model, architecture="flux"), options, "transformer", FlowMatchLoss(model),
                    inputs)
        self._first()


def _torch_pack(x):
    n, c, h, w = x.shape
    return x.reshape(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(n, h * w // 4, c * 4)


def _torch_unpack(t, h, w):
    n, _, d = t.shape
    return t.reshape(n, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(n, d // 4, h, w)


class TorchStep(C.TorchLoraStep):
    """torch + Hugging Face diffusers + peft: the same folder, targets, batch, loss and update."""

    def __init__(self, folder, targets, threads=None):
        torch = C.torch_threads(threads)
        from diffusers import FluxTransformer2DModel

        model = FluxTransformer2DModel.from_pretrained(folder, subfolder="transformer")
        self._attach(torch, model, rank=RANK, alpha=ALPHA, targets=targets, lr=LR)
        self.b = {k: torch.from_numpy(v) for k, v in batch().items()}
        rows, cols = LATENT // 2, LATENT // 2
        ids = torch.zeros(rows, cols, 3)
        ids[..., 1] = torch.arange(rows, dtype=torch.float32)[:, None]
        ids[..., 2] = torch.arange(cols, dtype=torch.float32)[None, :]
        self.img_ids, self.txt_ids = ids.reshape(-1, 3), torch.zeros(TOKENS, 3)
        self._first()

    def _run(self) -> float:
        b = self.b
        s = b["sigmas"].reshape(-1, 1, 1, 1)
        noisy = (1.0 - s) * b["latents"] + s * b["noise"]
        pred = self.model(hidden_states=_torch_pack(noisy), encoder_hidden_states=b["embeds"],
                          pooled_projections=b["pooled"], timestep=b["sigmas"], img_ids=self.img_ids,
                          txt_ids=self.txt_ids, guidance=b["guidance"], return_dict=False)[0]
        err = (_torch_unpack(pred.float(), LATENT, LATENT) - (b["noise"] - b["latents"])) ** 2
        return self._update((err.reshape(BATCH, -1).mean(dim=1) * b["weights"]).mean())


def run_step(args) -> dict:
    C.banner("Benchmark 9a: tiny FLUX.1-dev LoRA step vs torch + diffusers + peft (attn preset, rank 4, batch 2)")
    if not C.have_interop():
        print("SKIPPED: the interop extra (torch, diffusers, peft) is not installed: pip install -e '.[interop]'")
        return {}
    folder = C.run_child("bench_9_flux", "make_folder", os.path.join(C.workdir("flux"), "tiny-flux-dev"))
    times, info = C.compare_steps("bench_9_flux", [folder], [folder], reps=args.reps, warmup=args.warmup,
                                  same_loss=True)
    print(f"batch {BATCH} × 16×{LATENT}×{LATENT} latents ({LATENT * LATENT // 4} packed tokens), {TOKENS} T5 tokens, "
          f"{len(info['mindspore']['modules'])} LoRA modules, {info['mindspore']['trainable']:,} trainable parameters; "
          f"first loss {info['mindspore']['loss']:.6f} (MindSpore) / {info['torch']['loss']:.6f} (torch); torch "
          f"default threads {info['torch']['threads']}\n")
    ratio, best = C.print_step_comparison("tiny FLUX LoRA step", times, info)
    print(f"\nRATIO step mindspore/torch = {ratio:.2f} (vs {best}; context for the CPU backend, no target)",
          flush=True)
    return {"times": times, "info": info}


# ---------------------------------------------------------------------------------------------------- part 2: injection

def inject_child(side: str, preset: str) -> dict:
    """In a fresh process: build the full-size FLUX.1-dev transformer without allocating its weights, inject
    ``preset`` once through ``side`` (``plugin`` or ``direct``), check the result."""
    import _configs as K
    from mindone_lora_plugin.runtime.process import setup

    setup("CPU", "graph", seed=0)
    import mindone.peft.tuners.lora.layer  # noqa: F401  (imported before any timing)
    from mindone.diffusers import FluxTransformer2DModel
    from mindone.peft import LoraConfig
    from mindspore.nn.utils import no_init_parameters

    from mindone_lora_plugin.models import Models, lora_layers
    from mindone_lora_plugin.options import LoraOptions
    from mindone_lora_plugin.plugins import get_plugin_manager

    t0 = time.perf_counter()
    with no_init_parameters():
        model = FluxTransformer2DModel(**K.FLUX1_DEV_TRANSFORMER)
    build_s = time.perf_counter() - t0
    params = list(model.get_parameters())
    n_params = sum(int(p.size) for p in params)
    lazy_before = sum(1 for p in params if p.has_init)
    expected = K.flux_preset_shapes(K.FLUX1_DEV_TRANSFORMER, preset)
    targets = sorted(expected)
    pm = get_plugin_manager()
    pm.get_strategy("flux")  # loads the plugins once, as the trainer does before adding adapters
    models = Models(transformer=model, architecture="flux")
    options = LoraOptions(strategy="flux", architecture="flux", rank=INJECT_RANK, alpha=INJECT_ALPHA,
                          targets=preset, init="gaussian")

    def plugin():
        pm.add_adapters(models, options)

    def direct():
        model.add_adapter(LoraConfig(r=INJECT_RANK, lora_alpha=INJECT_ALPHA, init_lora_weights="gaussian",
                                     target_modules=targets))

    rss0 = C.rss_kib()["VmRSS"]
    _, seconds, extra, _ = C.measure_peak({"plugin": plugin, "direct": direct}[side])
    adapted = dict(lora_layers(model))
    if sorted(adapted) != targets:
        raise AssertionError(f"{side}/{preset}: adapted {len(adapted)} modules, expected {len(targets)}")
    lora_params = 0
    for path, layer in adapted.items():
        out_f, in_f = expected[path]
        a = layer.lora_A["default"].weight
        b = layer.lora_B["default"].weight
        if tuple(a.shape) != (INJECT_RANK, in_f) or tuple(b.shape) != (out_f, INJECT_RANK):
            raise AssertionError(f"{path}: lora_A {a.shape}, lora_B {b.shape} for a base ({out_f}, {in_f})")
        if a.has_init or b.has_init or not layer.base_layer.weight.has_init:
            raise AssertionError(f"{path}: LoRA weights not allocated, or the base weight was allocated")
        lora_params += int(a.size) + int(b.size)
    trainable = model.trainable_params()
    if sum(int(p.size) for p in trainable) != lora_params or any("lora_" not in p.name for p in trainable):
        raise AssertionError(f"{side}/{preset}: trainable parameters are not exactly the LoRA weights")
    lazy_after = sum(1 for p in model.get_parameters() if p.has_init and "lora_" not in p.name)
    return {"side": side, "preset": preset, "seconds": seconds, "peak_bytes": extra, "build_s": build_s,
            "params": n_params, "tensors": len(params), "lazy_before": lazy_before, "lazy_after": lazy_after,
            "rss_before_kib": rss0, "rss_after_kib": C.rss_kib()["VmRSS"], "modules": len(adapted),
            "lora_params": lora_params}


def run_inject(args) -> dict:
    import _configs as K

    C.banner("Benchmark 9b: injection on a full-size FLUX.1-dev transformer (from config, weights unallocated, "
             f"rank {INJECT_RANK})")
    cfg = K.FLUX1_DEV_TRANSFORMER
    print("config: " + ", ".join(f"{k} {v}" for k, v in cfg.items()), flush=True)
    results = {}
    rows = []
    for preset in args.presets:
        runs = []
        for r in range(args.inject_reps):
            for side in (("plugin", "direct") if r % 2 == 0 else ("direct", "plugin")):
                runs.append(C.run_child("bench_9_flux", "inject_child", side, preset, timeout=1200))
        results[preset] = runs
        times = {s: [x["seconds"] for x in runs if x["side"] == s] for s in ("plugin", "direct")}
        peaks = {s: C.median([x["peak_bytes"] for x in runs if x["side"] == s]) for s in ("plugin", "direct")}
        a, b = C.median(times["plugin"]), C.median(times["direct"])
        ratio = a / b
        rows.append([f"`{preset}` ({runs[0]['modules']} modules, {runs[0]['lora_params'] / 1e6:.1f}M LoRA params)",
                     C.fmt_s(a), C.fmt_s(b), f"{ratio:.3f}", C.fmt_bytes(peaks["plugin"]),
                     C.fmt_bytes(peaks["direct"]), C.verdict(ratio <= TARGET_RATIO)])
        print(f"  {preset}: plugin {[round(t, 3) for t in times['plugin']]} s, direct "
              f"{[round(t, 3) for t in times['direct']]} s", flush=True)
    r0 = results[args.presets[0]][0]
    print(f"\ntransformer: {r0['params'] / 1e9:.2f}B parameters in {r0['tensors']} tensors, built from config in "
          f"{C.fmt_s(r0['build_s'])} inside no_init_parameters() (not timed); {r0['lazy_before']} tensors "
          f"unallocated before and {r0['lazy_after']} after the injection; process RSS "
          f"{C.fmt_bytes(r0['rss_before_kib'] * 1024)} before, {C.fmt_bytes(r0['rss_after_kib'] * 1024)} after\n")
    C.print_table(["preset", "strategy hook (add_adapters)", "transformer.add_adapter(LoraConfig)", "ratio",
                   "peak RSS hook", "peak RSS direct", f"target ≤ {TARGET_RATIO}"], rows)
    for preset, row in zip(args.presets, rows):
        print(f"RATIO injection plugin/direct {preset} = {row[3]} (target ≤ {TARGET_RATIO}): {row[-1]}")
    print(f"medians of {args.inject_reps} injections per side and preset, each in a fresh process", flush=True)
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=30, help="interleaved tiny steps per configuration")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per configuration after the first")
    ap.add_argument("--inject-reps", type=int, default=6,
                    help="injections per side and preset (each in its own fresh process)")
    ap.add_argument("--only", choices=("step", "inject"), help="run one part only")
    ap.add_argument("--presets", nargs="+", choices=("attn", "kohya"), default=["attn", "kohya"],
                    help="the injection presets to measure")
    args = ap.parse_args(argv)

    C.banner("Benchmark 9: FLUX.1")
    C.print_machine()
    t_start = time.perf_counter()
    out = {"machine": C.machine()}
    if args.only != "inject":
        out["step"] = run_step(args)
    if args.only != "step":
        out["inject"] = run_inject(args)
    print(f"benchmark 9 took {time.perf_counter() - t_start:.0f} s", flush=True)
    C.save_results("bench_9", out)
    return 0


if __name__ == "__main__":
    sys.exit(C.run_main(main))
