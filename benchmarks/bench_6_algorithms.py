"""Benchmark 6 — adapter algorithms: LoHa and LoKr against plain LoRA.

1. **Training step** on the tiny SD1.x UNet (PyNative, CPU backend): one forward + backward through the adapters
   (``kohya`` preset, rank 4) for ``loha`` and ``lokr`` vs ``lora``; context (LoHa/LoKr rebuild ΔW every call).
2. **Injection** on a full-size SD1.5 UNet built from its config (random weights, nothing downloaded): the ``kohya``
   preset at rank 32 through ``pm.add_adapters`` (what ``mindone-lora train`` calls) for LoHa and LoKr vs plain LoRA.
   Each side in a fresh process (a UNet per injection). Target ≤ 1.3×.
3. **Read + convert** a full-size SDXL LoHa file (kohya preset, rank 32, fp16, synthetic weights with the real module
   shapes): ``read_lora`` + the kohya writer vs ``safetensors.numpy`` load + save of the same file. Target ≤ 1.5×.

    python benchmarks/bench_6_algorithms.py [--reps N] [--skip-injection]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

INJECT_TARGET = 1.3
IO_TARGET = 1.5


def step_child(algo: str, reps: int) -> dict:
    """Median seconds of one forward+backward of the tiny UNet with ``algo`` adapters (PyNative)."""
    import numpy as np

    from mindone_lora_plugin.runtime.process import setup

    setup("CPU", "pynative", seed=0)
    import mindspore as ms

    from mindone_lora_plugin.architectures.sd.tiny import ensure_tiny_model
    from mindone_lora_plugin.models import load_models
    from mindone_lora_plugin.options import LoraOptions
    from mindone_lora_plugin.plugins import get_plugin_manager

    folder = ensure_tiny_model("sd1", os.path.join(C.workdir("tiny"), "sd1"))
    pm = get_plugin_manager()
    models = load_models(folder, components=("unet",))
    options = LoraOptions(strategy="unet", rank=4, targets="kohya", algorithm=algo)
    pm.add_adapters(models, options)
    params = [p for g in pm.trainable_parameters(models, options) for p in g["params"]]
    unet = models["unet"]
    rng = np.random.default_rng(0)
    x = ms.Tensor(rng.standard_normal((2, 4, 32, 32)).astype(np.float32))
    e = ms.Tensor(rng.standard_normal((2, 8, 32)).astype(np.float32))
    t = ms.Tensor([10, 500], ms.int32)

    def loss():
        return unet(x, t, encoder_hidden_states=e, return_dict=False)[0].square().mean()

    grad = ms.value_and_grad(loss, None, params)
    grad()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        grad()
        times.append(time.perf_counter() - t0)
    return {"median": C.median(times), "params": sum(int(p.size) for p in params)}


def inject_child(algo: str) -> dict:
    """Seconds to add ``algo`` adapters (kohya preset, rank 32) to a freshly built full-size SD1.5 UNet."""
    import _configs as K
    from mindone_lora_plugin.runtime.process import setup

    setup("CPU", "graph", seed=0)
    import mindone.peft.tuners.lora.layer  # noqa: F401  (imported before any timing)
    from mindone.diffusers import UNet2DConditionModel

    from mindone_lora_plugin.models import Models, lora_layers
    from mindone_lora_plugin.options import LoraOptions
    from mindone_lora_plugin.plugins import get_plugin_manager

    unet = UNet2DConditionModel(**K.SD15_UNET)
    pm = get_plugin_manager()
    pm.get_algorithm(algo)
    options = LoraOptions(strategy="unet", rank=32, alpha=16.0, targets="kohya", algorithm=algo)
    t0 = time.perf_counter()
    pm.add_adapters(Models(unet=unet, architecture="sd1"), options)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "modules": sum(1 for _ in lora_layers(unet))}


def loha_state():
    """A full-size SDXL LoHa state (kohya preset, rank 32, fp16) with random factors."""
    import numpy as np

    import _configs as K
    from mindone_lora_plugin.state import LoraModule, LoraState

    rng = np.random.default_rng(0)
    state = LoraState(architecture="sdxl", unet_layers_per_block=2)
    r = 32
    for comp, modules in K.kohya_preset_shapes("sdxl").items():
        for path, shape in modules.items():
            out, flat = shape[0], int(np.prod(shape[1:]))
            t = {"hada_w1_a": (out, r), "hada_w1_b": (r, flat), "hada_w2_a": (out, r), "hada_w2_b": (r, flat)}
            tensors = {k: (rng.standard_normal(s, dtype=np.float32) * 0.02).astype(np.float16) for k, s in t.items()}
            state.add(comp, path, LoraModule(algorithm="loha", tensors=tensors, alpha=16.0))
    return state


def io_bench(reps: int) -> dict:
    from safetensors.numpy import load_file, save_file

    from mindone_lora_plugin.formats.kohya import KohyaFormat
    from mindone_lora_plugin.formats.reader import read_lora

    work = C.workdir("io")
    src = KohyaFormat().write(loha_state(), os.path.join(work, "loha.safetensors"))
    size = os.path.getsize(src)
    state, plain_tensors = read_lora(src), load_file(src)

    def ours():
        KohyaFormat().write(read_lora(src), os.path.join(work, "ours.safetensors"))

    def plain():
        save_file(load_file(src), os.path.join(work, "plain.safetensors"))

    # the two halves apart (context): where the difference goes
    sides = {"ours": ours, "plain": plain, "ours_read": lambda: read_lora(src), "plain_read": lambda: load_file(src),
             "ours_write": lambda: KohyaFormat().write(state, os.path.join(work, "ours_w.safetensors")),
             "plain_write": lambda: save_file(plain_tensors, os.path.join(work, "plain_w.safetensors"))}
    times = C.interleave(sides, reps)
    return {**{k: C.median(v) for k, v in times.items()}, "bytes": size}


def run(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--skip-injection", action="store_true", help="skip the full-size injection (≈ 4 GB per process)")
    args = ap.parse_args(argv)
    C.banner("Benchmark 6: adapter algorithms (LoHa, LoKr) vs plain LoRA")
    C.print_machine()
    results = {}

    steps = {a: C.run_child("bench_6_algorithms", "step_child", a, args.reps) for a in ("lora", "loha", "lokr")}
    results["steps"] = steps
    rows = [[a, C.fmt_s(steps[a]["median"]), f"{steps[a]['params']:,}",
             f"{steps[a]['median'] / steps['lora']['median']:.2f}", "context"] for a in ("loha", "lokr")]
    C.print_table(["tiny UNet step (PyNative)", "median", "trainable params", "ratio vs lora", "result"],
                  [["lora", C.fmt_s(steps["lora"]["median"]), f"{steps['lora']['params']:,}", "1.00", "—"]] + rows)

    if not args.skip_injection:
        inj = {a: C.run_child("bench_6_algorithms", "inject_child", a, timeout=1200) for a in ("lora", "loha", "lokr")}
        results["injection"] = inj
        print()
        C.print_table(["SD1.5 injection (kohya, r32)", "seconds", "modules", f"ratio vs lora (≤ {INJECT_TARGET})",
                       "result"],
                      [[a, C.fmt_s(inj[a]["seconds"]), inj[a]["modules"],
                        f"{inj[a]['seconds'] / inj['lora']['seconds']:.2f}",
                        C.verdict(inj[a]["seconds"] / inj["lora"]["seconds"] <= INJECT_TARGET) if a != "lora" else "—"]
                       for a in ("lora", "loha", "lokr")])

    io = io_bench(args.reps)
    results["io"] = io
    ratio = io["ours"] / io["plain"]
    print()
    C.print_table(["SDXL LoHa file", "read_lora + kohya write", "safetensors load + save", f"ratio (≤ {IO_TARGET})",
                   "result"],
                  [[C.fmt_bytes(io["bytes"]), C.fmt_s(io["ours"]), C.fmt_s(io["plain"]), f"{ratio:.2f}",
                    C.verdict(ratio <= IO_TARGET)],
                   ["  read only (context)", C.fmt_s(io["ours_read"]), C.fmt_s(io["plain_read"]),
                    f"{io['ours_read'] / io['plain_read']:.2f}", "context"],
                   ["  write only, sshs hashes included (context)", C.fmt_s(io["ours_write"]),
                    C.fmt_s(io["plain_write"]), f"{io['ours_write'] / io['plain_write']:.2f}", "context"]])
    print(f"RATIO read+convert LoHa / plain safetensors = {ratio:.2f} (target ≤ {IO_TARGET}): "
          f"{C.verdict(ratio <= IO_TARGET)}")
    C.save_results("bench_6", {"results": results, "machine": C.machine()})
    return 0


if __name__ == "__main__":
    sys.exit(C.run_main(run))
