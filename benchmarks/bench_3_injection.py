"""Benchmark 3 — adapter injection at full size.

A full-size SD1.5 UNet (860M parameters) built from its published config with random weights (``_configs.py``; nothing
downloaded). Side A adds the ``kohya`` preset (192 modules, rank 32, alpha 16) through the strategy hook —
``get_plugin_manager().add_adapters(models, options)``, what ``mindone-lora train`` calls: target selection, freezing,
``LoraConfig`` with per-module patterns, ``add_adapter``, listing the adapted layers. Side B calls mindone's
``unet.add_adapter(LoraConfig(...))`` directly with the same target list, rank, alpha and init.

Two fresh processes each build the UNet once (not timed), then inject A and B alternately (A B B A ... in one, B A A B
... in the other), removing the adapters between injections with mindone's ``unet.unload_lora()``. Judged: median
injection time A / B (target ≤ 1.05). Peak RSS: the high-water mark during the *first* injection of each process above
the RSS just before it (one process starts with A, the other with B, so each side's figure comes from a first
injection on an untouched UNet).

    python benchmarks/bench_3_injection.py [--reps N]
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

RANK = 32
ALPHA = 16.0
TARGET_RATIO = 1.05


def inject_child(first: str, reps: int) -> dict:
    """Build the SD1.5 UNet, then inject ``reps`` times per side, alternating, starting with ``first``."""
    import _configs as K
    from mindone_lora_plugin.runtime.process import setup

    setup("CPU", "graph", seed=0)
    import mindone.peft.tuners.lora.layer  # noqa: F401  (imported before any timing)
    from mindone.diffusers import UNet2DConditionModel
    from mindone.peft import LoraConfig

    from mindone_lora_plugin.models import Models, lora_layers
    from mindone_lora_plugin.options import LoraOptions
    from mindone_lora_plugin.plugins import get_plugin_manager

    t0 = time.perf_counter()
    unet = UNet2DConditionModel(**K.SD15_UNET)
    build_s = time.perf_counter() - t0
    n_params = sum(int(p.size) for p in unet.get_parameters())
    pm = get_plugin_manager()
    strategy = pm.get_strategy("unet")  # loads the plugins once, as the trainer does before adding adapters
    models = Models(unet=unet, architecture="sd1")
    options = LoraOptions(strategy="unet", rank=RANK, alpha=ALPHA, targets="kohya", init="gaussian")
    targets = sorted(strategy.target_modules("unet", unet, options))
    expected = set(K.unet_kohya_shapes(K.SD15_UNET))
    if set(targets) != expected:
        raise AssertionError(f"the strategy targets {len(targets)} modules, the config-derived kohya preset has "
                             f"{len(expected)}")

    def plugin():
        return pm.add_adapters(models, options)

    def direct():
        unet.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights="gaussian", target_modules=targets))

    sides = {"plugin": plugin, "direct": direct}
    order = [first, "direct" if first == "plugin" else "plugin"]
    times = {"plugin": [], "direct": []}
    first_peak = None
    checks = {}
    for r in range(reps):
        for name in (order if r % 2 == 0 else order[::-1]):
            _, seconds, extra, _ = C.measure_peak(sides[name])
            if first_peak is None:
                first_peak = {"side": name, "bytes": extra}
            times[name].append(seconds)
            adapted = sorted(p for p, _ in lora_layers(unet))
            trainable = sum(int(p.size) for p in unet.trainable_params())
            checks.setdefault(name, (len(adapted), trainable))
            if adapted != targets:
                raise AssertionError(f"{name}: adapted {len(adapted)} modules, expected {len(targets)}")
            unet.unload_lora()
            for p in unet.get_parameters():
                p.requires_grad = True  # back to the state of a freshly built UNet
            gc.collect()
    return {"build_s": build_s, "params": n_params, "times": times, "first_peak": first_peak, "checks": checks,
            "modules": len(targets)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=10, help="injections per side in each of the two processes")
    args = ap.parse_args(argv)

    C.banner("Benchmark 3: adapter injection at full size (SD1.5 UNet from config, kohya preset, rank 32)")
    C.print_machine()
    t_start = time.perf_counter()
    runs = [C.run_child("bench_3_injection", "inject_child", first, args.reps) for first in ("plugin", "direct")]
    times = {s: [t for r in runs for t in r["times"][s]] for s in ("plugin", "direct")}
    peaks = {r["first_peak"]["side"]: r["first_peak"]["bytes"] for r in runs}
    a, b = C.median(times["plugin"]), C.median(times["direct"])
    ratio = a / b
    r0 = runs[0]
    print(f"UNet: {r0['params'] / 1e6:.0f}M parameters, built from config in {C.fmt_s(r0['build_s'])} "
          f"(not timed); {r0['modules']} modules adapted, trainable parameters "
          f"{r0['checks']['plugin'][1]:,} (plugin) / {r0['checks']['direct'][1]:,} (direct)\n", flush=True)
    C.print_table(["injection", "strategy hook (add_adapters)", "unet.add_adapter(LoraConfig)", "ratio",
                   f"target ≤ {TARGET_RATIO}", "result"],
                  [["median time", C.fmt_s(a), C.fmt_s(b), f"{ratio:.3f}", f"≤ {TARGET_RATIO}",
                    C.verdict(ratio <= TARGET_RATIO)],
                   ["peak RSS (first injection)", C.fmt_bytes(peaks["plugin"]), C.fmt_bytes(peaks["direct"]),
                    f"{peaks['plugin'] / max(peaks['direct'], 1):.2f}", "—", "context"]])
    print(f"\nmedians of {len(times['plugin'])} injections per side over two processes "
          f"(min {C.fmt_s(min(times['plugin']))} / {C.fmt_s(min(times['direct']))})")
    print(f"RATIO injection plugin/direct = {ratio:.3f} (target ≤ {TARGET_RATIO}): {C.verdict(ratio <= TARGET_RATIO)}")
    print(f"benchmark 3 took {time.perf_counter() - t_start:.0f} s", flush=True)
    C.save_results("bench_3", {"runs": runs, "machine": C.machine()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
