"""Benchmark 5 — a full-size SD1.5 (or SDXL) LoRA step: MindSpore (this package) versus torch + diffusers + peft.

The UNet is built from the published SD1.5 config (``benchmarks/_configs.py``; random weights, nothing downloaded),
LoRA rank 16 on the attention projections (``to_q/to_k/to_v/to_out.0``, the default ``attn`` targets), batch 1 at
``--resolution`` pixels (latents of an eighth of that), 77-token text embeddings, the loss and update of
``mindone-lora train`` (per-sample-weighted MSE, clipping at 1.0, AdamW). Configurations:

* MindSpore PyNative (what ``--mode auto`` picks for a full-size model on CPU) fp32; with ``--gradient_checkpointing``
  (recompute of the blocks); with fp16 frozen weights; GRAPH_MODE fp32 with and without recompute (``--graph``);
* torch fp32 (default threads), and with ``unet.enable_gradient_checkpointing()``.

Each configuration runs in its own fresh process, one process at a time (two full-size models do not fit next to the
other work on a 24 GiB machine), in the order MindSpore, torch, MindSpore, torch, ...; a watchdog kills a process whose
RSS passes ``--cap-gib`` and reports it. Reported per configuration: time of the first step (GRAPH_MODE: the compile),
median s/step of the next ``--steps``, and the peak RSS from the first step on (``VmHWM`` reset after the model is
built, so the fp32 initialisation of a model then cast to fp16 is not counted; the trainer loads weights in their
dtype). Judged: peak RSS ≤ 1.5× torch's (fp32), fp16 and recompute below torch fp32's, s/step ≤ 1.5× torch's.

``--model sdxl``: the SDXL base UNet (2.6B parameters) at 1024 px with the pooled text embedding and size
conditioning, recompute only (fp32 and fp16 in MindSpore, torch with checkpointing); judged: each MindSpore
configuration fits in 20 GiB, and s/step against torch's. A step takes minutes on a laptop-class CPU, so
``--steps 0`` (the first step only) is the practical setting there.

    python benchmarks/bench_5_full_size.py [--model sd15|sdxl] [--resolution PX] [--steps 3] [--graph] [--only NAME,...]
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

RANK = 16
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # the plugin's ``attn`` preset
LR = 1e-4


MODELS = {"sd15": ("SD1.5", "SD15_UNET", 512), "sdxl": ("SDXL", "SDXL_UNET", 1024)}  # label, config, resolution


def unet_config(model: str) -> dict:
    import _configs

    return getattr(_configs, MODELS[model][1])


def batch(resolution: int, model: str = "sd15", seed: int = 0) -> dict:
    """Latents at an eighth of ``resolution``, 77-token text embeddings; for SDXL also the pooled text embedding and
    the six size/crop conditioning numbers."""
    import numpy as np

    rng = np.random.default_rng(seed)
    side = resolution // 8
    cfg = unet_config(model)
    out = {"latents": rng.standard_normal((1, 4, side, side), dtype=np.float32),
           "noise": rng.standard_normal((1, 4, side, side), dtype=np.float32),
           "t": np.array([500], np.int32), "a": np.array([0.5], np.float32), "s": np.array([0.866], np.float32),
           "weights": np.ones(1, np.float32),
           "embeds": rng.standard_normal((1, 77, cfg["cross_attention_dim"]), dtype=np.float32)}
    if model == "sdxl":
        out["pooled"] = rng.standard_normal((1, 1280), dtype=np.float32)
        out["time_ids"] = np.array([[resolution, resolution, 0, 0, resolution, resolution]], np.float32)
    return out


class MindSporeStep(C.MindSporeLoraStep):
    """The plugin's step (``DenoiseLoss`` + ``build_steps``) on the full-size UNet."""

    def __init__(self, resolution, mode="graph", dtype="fp32", gc=False, model="sd15"):
        from mindone_lora_plugin.runtime.process import setup

        setup("CPU", mode, seed=0)
        import mindspore as ms
        from mindone.diffusers import UNet2DConditionModel

        from mindone_lora_plugin.architectures.sd.loss import DenoiseLoss, TextConditioner
        from mindone_lora_plugin.models import Models
        from mindone_lora_plugin.options import LoraOptions
        from mindone_lora_plugin.runtime import recompute

        t0 = time.perf_counter()
        unet = UNet2DConditionModel(**unet_config(model))
        if dtype == "fp16":
            unet.to(ms.float16)
        unet.set_train(False)
        for p in unet.get_parameters():
            p.requires_grad = False
        options = LoraOptions(strategy="unet", rank=RANK, alpha=RANK, targets="attn", init="gaussian",
                              learning_rate=LR)
        b = batch(resolution, model)
        sdxl = model == "sdxl"
        names = ("latents", "noise", "t", "a", "s", "weights", "embeds") + (("pooled", "time_ids") if sdxl else ())
        inputs = [ms.Tensor(b[k]) for k in names]
        self._build(Models(unet=unet, architecture="sdxl" if sdxl else "sd1"), options, "unet",
                    DenoiseLoss(unet, TextConditioner(None), False, False, sdxl), inputs,
                    before_optimizer=(lambda: recompute.enable(unet, "unet")) if gc else None)
        self.extra_info = {"build_s": time.perf_counter() - t0, "lora_dtypes": self.lora_dtypes}
        self._first()


class TorchStep(C.TorchLoraStep):
    """torch + diffusers + peft: the same UNet config, targets, rank, batch and update."""

    def __init__(self, resolution, gc=False, model="sd15"):
        torch = C.torch_threads()
        from diffusers import UNet2DConditionModel

        t0 = time.perf_counter()
        self._attach(torch, UNet2DConditionModel(**unet_config(model)), rank=RANK, alpha=RANK, targets=TARGETS, lr=LR,
                     checkpointing=gc)
        self.b = {k: torch.from_numpy(v) for k, v in batch(resolution, model).items()}
        self.b["t"] = self.b["t"].long()
        self.extra_info["build_s"] = time.perf_counter() - t0
        self._first()

    def _run(self) -> float:
        return self._update(C.torch_unet_loss(self.model, self.b))


def _status_kib(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


MIN_AVAILABLE_KIB = 1 << 20  # the watchdog also stops a worker when the machine has less than 1 GiB available


def _mem_available_kib() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 1 << 40


class Watchdog:
    """Polls a process's RSS every 0.2 s; kills it above ``cap_kib``, or when the machine's available memory falls
    under 1 GiB (other work shares the machine), and remembers that it did."""

    def __init__(self, pid: int, cap_kib: int):
        self.pid, self.cap, self.killed, self.max_seen = pid, cap_kib, False, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self):
        while not self._stop.wait(0.2):
            rss = _status_kib(self.pid, "VmRSS")
            self.max_seen = max(self.max_seen, rss)
            if rss > self.cap or _mem_available_kib() < MIN_AVAILABLE_KIB:
                self.killed = True
                try:
                    os.kill(self.pid, 9)
                except OSError:
                    pass
                return

    def stop(self):
        self._stop.set()
        self._thread.join()


def run_config(name: str, factory: str, args: list, steps: int, cap_gib: float) -> dict:
    """One configuration in a fresh worker process: first step, ``steps`` timed steps, peak RSS; never raises."""
    t0 = time.perf_counter()
    worker, dog = None, None

    def arm(pid):  # before the model is built
        nonlocal dog
        dog = Watchdog(pid, int(cap_gib * (1 << 20)))

    try:
        worker = C.Worker("bench_5_full_size", factory, *args, on_start=arm,
                          env=C.MINDSPORE_ENV if factory.startswith("MindSpore") else None)
        times = [worker.step() for _ in range(steps)]
        peak = _status_kib(worker.proc.pid, "VmHWM")
        return {"name": name, "ok": True, "times": times, "peak_kib": peak, "info": worker.info,
                "wall_s": time.perf_counter() - t0}
    except (RuntimeError, OSError, ValueError) as e:
        over = dog is not None and dog.killed
        lines = [ln for ln in str(e).splitlines() if ln.strip()]
        return {"name": name, "ok": False, "over_cap": over, "max_rss_kib": dog.max_seen if dog else 0,
                "error": (f"killed above the {cap_gib:g} GiB cap or under 1 GiB available" if over
                          else (lines[-1] if lines else "failed")[:200]),
                "wall_s": time.perf_counter() - t0}
    finally:
        if dog is not None:
            dog.stop()
        if worker is not None:
            worker.close()


SDXL_BUDGET_GIB = 20  # issue #12: SDXL at 1024 px with recompute must fit in 20 GiB


def per_step(res: dict) -> float:
    """Median seconds of the timed steps, or the first step's when none was timed (``--steps 0``; in PyNative
    the first step compiles nothing)."""
    return C.median(res["times"]) if res["times"] else res["info"]["first_step_s"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="sd15",
                    help="sd15 (default) or sdxl (UNet 2.6B parameters; recompute configurations only)")
    ap.add_argument("--resolution", type=int, default=None, help="pixels (default: 512 for sd15, 1024 for sdxl)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per configuration after the first")
    ap.add_argument("--cap-gib", type=float, default=None,
                    help="RSS above which a configuration is killed (default 14; sdxl: 20, the issue's budget)")
    ap.add_argument("--graph", action="store_true",
                    help="also run MindSpore GRAPH_MODE (needs more than 16 GiB at 512 px on CPU)")
    ap.add_argument("--only", type=str, default=None, help="comma-separated configuration names to run")
    args = ap.parse_args(argv)

    label, _, default_res = MODELS[args.model]
    r = args.resolution or default_res
    sdxl = args.model == "sdxl"
    cap = args.cap_gib or (SDXL_BUDGET_GIB if sdxl else 14.0)
    C.banner(f"Benchmark 5: full-size {label} LoRA step at {r} px, batch 1, rank {RANK} (MindSpore CPU vs torch)")
    C.print_machine()
    if not C.have_interop():
        print("SKIPPED: the interop extra (torch, diffusers, peft) is not installed: pip install -e '.[interop]'")
        return 0
    m = args.model
    if sdxl:
        configs = [("mindspore pynative fp32 + recompute", "MindSporeStep", [r, "pynative", "fp32", True, m]),
                   ("torch fp32 + checkpointing", "TorchStep", [r, True, m]),
                   ("mindspore pynative fp16 + recompute", "MindSporeStep", [r, "pynative", "fp16", True, m])]
    else:
        configs = [("mindspore pynative fp32", "MindSporeStep", [r, "pynative", "fp32", False]),
                   ("torch fp32", "TorchStep", [r, False]),
                   ("mindspore pynative fp32 + recompute", "MindSporeStep", [r, "pynative", "fp32", True]),
                   ("torch fp32 + checkpointing", "TorchStep", [r, True]),
                   ("mindspore pynative fp16", "MindSporeStep", [r, "pynative", "fp16", False]),
                   ("mindspore pynative fp16 + recompute", "MindSporeStep", [r, "pynative", "fp16", True])]
    if args.graph:
        configs += [("mindspore graph fp32", "MindSporeStep", [r, "graph", "fp32", False, m]),
                    ("mindspore graph fp32 + recompute", "MindSporeStep", [r, "graph", "fp32", True, m])]
    if args.only:
        wanted = {n.strip() for n in args.only.split(",")}
        configs = [c for c in configs if c[0] in wanted]
    t_start = time.perf_counter()
    results = {}
    for name, factory, cargs in configs:
        print(f"running {name} ...", flush=True)
        results[name] = run_config(name, factory, cargs, args.steps, cap)
    gib = 1 << 20
    rows = []
    for name, res in results.items():
        if res["ok"]:
            rows.append([name, C.fmt_s(res["info"]["first_step_s"]), C.fmt_s(per_step(res)),
                         f"{res['peak_kib'] / gib:.1f} GiB", C.fmt_s(res["info"]["build_s"])])
        else:
            rows.append([name, "—", "—", f"> {res['max_rss_kib'] / gib:.1f} GiB" if res.get("over_cap") else "—",
                         res["error"]])
    C.print_table(["configuration", "first step", "median s/step", "peak RSS (steps)", "build / note"], rows)

    def ok(n):
        return n in results and results[n]["ok"]

    print()
    verdicts = {}
    for name in [n for n in results if sdxl and n.startswith("mindspore")]:
        fits = ok(name) and results[name]["peak_kib"] <= SDXL_BUDGET_GIB * gib
        verdicts[name + " memory"] = fits
        got = f"{results[name]['peak_kib'] / gib:.1f} GiB" if ok(name) else results[name]["error"]
        print(f"RATIO peak RSS {name} = {got} (fits in {SDXL_BUDGET_GIB} GiB): {C.verdict(fits)}")
    if ok("torch fp32"):
        tp = results["torch fp32"]["peak_kib"]
        for name, limit, what in (("mindspore pynative fp32", 1.5, "peak RSS ≤ 1.5× torch's"),
                                  ("mindspore pynative fp16", 1.5, "peak RSS ≤ 1.5× torch's"),
                                  ("mindspore pynative fp32 + recompute", 1.0, "peak RSS below torch's"),
                                  ("mindspore graph fp32", 1.5, "peak RSS ≤ 1.5× torch's")):
            if name in results:
                if ok(name):
                    ratio = results[name]["peak_kib"] / tp
                    verdicts[name + " memory"] = ratio <= limit
                    print(f"RATIO peak RSS {name} / torch fp32 = {ratio:.2f} ({what}): {C.verdict(ratio <= limit)}")
                else:
                    verdicts[name + " memory"] = False
                    print(f"RATIO peak RSS {name} / torch fp32: {results[name]['error']} ({what}): MISS")
        if ok("mindspore pynative fp16") and ok("mindspore pynative fp32"):
            ratio = results["mindspore pynative fp16"]["peak_kib"] / results["mindspore pynative fp32"]["peak_kib"]
            verdicts["fp16 lowers memory"] = ratio < 1.0
            print(f"RATIO peak RSS mindspore pynative fp16 / fp32 = {ratio:.2f} (< 1: fp16 lowers memory): "
                  f"{C.verdict(ratio < 1.0)}")
        if ok("mindspore pynative fp16 + recompute"):
            ratio = results["mindspore pynative fp16 + recompute"]["peak_kib"] / tp
            print(f"RATIO peak RSS mindspore pynative fp16 + recompute / torch fp32 = {ratio:.2f} (context)")
    for name, ref in (("mindspore pynative fp32", "torch fp32"),
                      ("mindspore pynative fp32 + recompute", "torch fp32 + checkpointing")):
        if ok(name) and ok(ref):
            ratio = per_step(results[name]) / per_step(results[ref])
            verdicts[name + " speed"] = ratio <= 1.5
            print(f"RATIO s/step {name} / {ref} = {ratio:.2f} (≤ 1.5): {C.verdict(ratio <= 1.5)}")
    print(f"benchmark 5 took {time.perf_counter() - t_start:.0f} s", flush=True)
    C.save_results("bench_5" + ("_sdxl" if sdxl else ""),
                   {"results": results, "model": m, "resolution": r, "machine": C.machine()})
    return 0


if __name__ == "__main__":
    sys.exit(C.run_main(main))
