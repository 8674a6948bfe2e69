"""Shared helpers of the benchmarks: side-by-side timing, peak memory of one operation, tables, machine facts.

Every benchmark judges *ratios* measured in the same run: the two sides are repeated in alternating order (A B, B A,
A B, ...) and compared by their medians, so a machine that is busy or slows down during the run affects both sides
alike. Absolute seconds are printed as context only.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from types import SimpleNamespace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("GLOG_v", "3")  # MindSpore's C++ logging: errors only
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
_BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
if _BENCH_DIR not in sys.path:
    sys.path.insert(0, _BENCH_DIR)

#: a MindSpore side's environment: the one the ``mindone-lora`` command gives itself (transformers leaves torch
#: unimported, so torch's libraries do not count in the MindSpore side's memory)
from mindone_lora_plugin.cli import COMMAND_ENV as MINDSPORE_ENV  # noqa: E402

# ---------------------------------------------------------------------------------------------------- timing

def median(xs) -> float:
    return float(statistics.median(xs))


def interleave(fns: dict, reps: int, *, self_timed: bool = False) -> dict[str, list[float]]:
    """Run every callable of ``fns`` ``reps`` times, alternating the order each repetition (ABC, CBA, ABC, ...).

    Returns name → list of seconds: the wall time of each call, or with ``self_timed`` the number each call returns
    (e.g. a step timed inside a worker process).
    """
    names = list(fns)
    times = {n: [] for n in names}
    for r in range(reps):
        for n in (names if r % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            out = fns[n]()
            dt = time.perf_counter() - t0
            times[n].append(float(out) if self_timed else dt)
    return times


@contextmanager
def stopwatch(into: dict, key: str):
    t0 = time.perf_counter()
    try:
        yield
    finally:
        into[key] = time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------------- memory

def rss_kib() -> dict[str, int]:
    """``VmRSS`` and ``VmHWM`` (peak) of this process, in KiB."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1])
    return out


def reset_peak() -> bool:
    """Reset this process's peak RSS (``VmHWM``) to the current RSS (Linux ≥ 4.0); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _anon_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    return 0


def measure_peak(fn, sample_anon: bool = False):
    """Run ``fn()``; return ``(result, seconds, extra peak bytes, extra peak private bytes or None)``.

    The first figure is the kernel's RSS high-water mark during the call above the RSS just before it: the memory the
    operation needed on top of what the process already held. RSS counts the pages of memory-mapped files too (a
    ``safetensors`` reader maps the file), so with ``sample_anon`` a thread also samples ``RssAnon`` (private memory
    only) every millisecond and the second figure is its peak above the value before the call (approximate).
    """
    import gc
    import threading

    gc.collect()
    exact = reset_peak()
    before = rss_kib()
    base = before["VmRSS"] if exact else before["VmHWM"]
    anon0, anon_peak, stop = _anon_kib(), [0], threading.Event()

    def sampler():
        while not stop.is_set():
            anon_peak[0] = max(anon_peak[0], _anon_kib())
            stop.wait(0.001)

    thread = None
    if sample_anon:
        old_interval = sys.getswitchinterval()
        sys.setswitchinterval(0.0005)
        thread = threading.Thread(target=sampler, daemon=True)
        thread.start()
    t0 = time.perf_counter()
    try:
        result = fn()
    finally:
        dt = time.perf_counter() - t0
        if thread is not None:
            anon_peak[0] = max(anon_peak[0], _anon_kib())
            stop.set()
            thread.join()
            sys.setswitchinterval(old_interval)
    peak = rss_kib()["VmHWM"]
    anon = max(0, anon_peak[0] - anon0) * 1024 if sample_anon else None
    return result, dt, max(0, peak - base) * 1024, anon


def run_child(module: str, func: str, *args, timeout: float = 600, env: dict | None = None):
    """Call ``module.func(*args)`` in a fresh Python process (this venv); return what it returns (JSON-able).

    The child's stdout is kept for the result; its stderr passes through only when it fails.
    """
    code = ("import json, sys; sys.path[:0] = [%r, %r]; import %s as m; r = m.%s(*json.loads(sys.argv[1])); "
            "sys.stdout.flush(); print('\\n@@RESULT@@' + json.dumps(r))" % (ROOT, _BENCH_DIR, module, func))
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(list(args))], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, **(env or {})))
    if proc.returncode != 0 or "@@RESULT@@" not in proc.stdout:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise RuntimeError(f"child {module}.{func}{tuple(args)!r} failed (exit status {proc.returncode})")
    return json.loads(proc.stdout.rsplit("@@RESULT@@", 1)[1])


class Worker:
    """A long-lived Python process holding one side of a comparison (e.g. one framework), driven step by step.

    ``module.factory(*args)`` builds an object with ``step() -> None`` (and optionally ``info() -> dict``) in the
    child; :meth:`step` runs one step there and returns the seconds the child measured around it. While one worker
    steps, the other waits blocked on its pipe, so the two never run at the same time.
    """

    _LOOP = r"""
import json, sys, time
sys.path[:0] = [%r, %r]
out = sys.stdout
sys.stdout = sys.stderr  # library chatter must not reach the command pipe
import %s as m
obj = m.%s(*json.loads(sys.argv[1]))
out.write(json.dumps({"ready": True, "info": obj.info() if hasattr(obj, "info") else {}}) + "\n"); out.flush()
for line in sys.stdin:
    cmd = line.strip()
    if cmd == "step":
        t0 = time.perf_counter(); obj.step(); dt = time.perf_counter() - t0
        out.write(json.dumps({"seconds": dt}) + "\n"); out.flush()
    elif cmd == "quit":
        break
"""

    def __init__(self, module: str, factory: str, *args, quiet: bool = True, on_start=None, env: dict | None = None):
        """``on_start(pid)``, when given, is called as soon as the process exists, before the object is built (e.g.
        to arm a memory watchdog); ``env`` is added to the child's environment (:data:`MINDSPORE_ENV` for a
        MindSpore side)."""
        code = self._LOOP % (ROOT, _BENCH_DIR, module, factory)
        self.name = f"{module}.{factory}"
        self._err = tempfile.TemporaryFile(mode="w+") if quiet else None
        self.proc = subprocess.Popen([sys.executable, "-c", code, json.dumps(list(args))], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._err, text=True, bufsize=1,
                                     env=dict(os.environ, **(env or {})))
        if on_start is not None:
            on_start(self.proc.pid)
        self.info = self._read()["info"]

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            tail = ""
            if self._err is not None:
                self._err.seek(0)
                tail = self._err.read()[-6000:]
            raise RuntimeError(f"worker {self.name} ended (exit status {self.proc.returncode}):\n{tail}")
        return json.loads(line)

    def step(self) -> float:
        self.proc.stdin.write("step\n")
        self.proc.stdin.flush()
        return float(self._read()["seconds"])

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        if self._err is not None:
            self._err.close()


# ---------------------------------------------------------------------------------------------------- reporting

def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def fmt_s(x: float) -> str:
    if x >= 100:
        return f"{x:.0f} s"
    if x >= 1:
        return f"{x:.2f} s"
    return f"{x * 1000:.1f} ms"


def fmt_bytes(n: float) -> str:
    for unit, k in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= k:
            return f"{n / k:.1f} {unit}"
    return f"{n:.0f} B"


def print_table(header: list[str], rows: list[list]) -> None:
    """A GitHub-markdown table on stdout."""
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    print(line(cells[0]))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in cells[1:]:
        print(line(r))
    sys.stdout.flush()


def banner(title: str) -> None:
    print(f"\n## {title}\n", flush=True)


def machine() -> dict[str, str]:
    """nproc, CPU model, memory, OS, Python and the versions that matter."""
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = "?"
    try:
        with open("/proc/meminfo") as f:
            kib = int(f.readline().split()[1])
        mem = f"{kib / (1 << 20):.0f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    load = "?"
    try:
        load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        pass
    out = {"nproc": str(os.cpu_count()), "cpu": cpu, "memory": mem, "load average": load,
           "python": platform.python_version(), "os": platform.platform(terse=True)}
    from importlib import metadata

    for dist in ("mindspore", "mindone", "safetensors", "numpy", "torch", "diffusers", "peft"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def print_machine() -> None:
    m = machine()
    print("machine: " + "; ".join(f"{k} {v}" for k, v in m.items()), flush=True)


def have_interop() -> bool:
    """True when the ``interop`` extra (torch, Hugging Face diffusers, peft) is importable."""
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("torch", "diffusers", "peft"))


_WORKDIRS: list[str] = []


def workdir(prefix: str) -> str:
    """A fresh temporary folder, removed by :func:`run_main` when the benchmark ends (also on failure)."""
    folder = tempfile.mkdtemp(prefix=f"mindone-lora-bench-{prefix}-")
    _WORKDIRS.append(folder)
    return folder


def run_main(run, argv=None) -> int:
    """Run a benchmark's ``run(argv)`` and remove the folders it made with :func:`workdir`."""
    import shutil

    try:
        return run(argv)
    finally:
        while _WORKDIRS:
            shutil.rmtree(_WORKDIRS.pop(), ignore_errors=True)


def save_results(name: str, data: dict) -> None:
    """Write ``data`` as JSON to ``$BENCH_RESULTS/<name>.json`` when that variable names a folder."""
    folder = os.environ.get("BENCH_RESULTS")
    if not folder:
        return
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"{name}.json"), "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)


# ---------------------------------------------------------------------------------------------------- LoRA steps

class LoraStep:
    """One side of a step comparison, built in a :class:`Worker`: a subclass builds its model and calls
    ``_first()``; :meth:`step` runs one more step and :meth:`info` says what was built and how the first step went.

    The first step runs after a garbage collection, with the peak RSS reset (so ``VmHWM`` read afterwards is the
    peak of the steps, not of building the model)."""

    adapted: list = []
    trainable = 0
    extra_info: dict = {}

    def _run(self) -> float:  # pragma: no cover - each side defines its step
        raise NotImplementedError

    def _first(self) -> None:
        import gc

        gc.collect()
        reset_peak()
        t0 = time.perf_counter()
        self.first_loss = self._run()
        self.first_step_s = time.perf_counter() - t0

    def step(self) -> None:
        self._run()

    def info(self) -> dict:
        return {"modules": sorted(self.adapted), "trainable": self.trainable, "first_step_s": self.first_step_s,
                "loss": self.first_loss, **self.extra_info}


#: the trainer's optimizer settings for the benchmarks: AdamW, β 0.9/0.999, ε 1e-8, weight decay 1e-2
TRAINER_ADAMW = SimpleNamespace(
    optimizer_type="AdamW", optimizer_args=None, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
    adam_weight_decay=1e-2, loraplus_lr_ratio=None, loraplus_unet_lr_ratio=None, loraplus_text_encoder_lr_ratio=None)


class MindSporeLoraStep(LoraStep):
    """The plugin's side: adapters and parameter groups through the plugin hooks, the optimizer the trainer builds
    (``train.optimizers.build`` with :data:`TRAINER_ADAMW`, a per-step learning-rate list), the loss cell wrapped by
    ``build_steps`` with clipping at 1.0: the step ``mindone-lora train`` builds."""

    def _build(self, models, options, component: str, loss, inputs, *, before_optimizer=None) -> None:

        from mindone_lora_plugin.plugins import get_plugin_manager
        from mindone_lora_plugin.train import optimizers
        from mindone_lora_plugin.train.step import build_steps

        pm = get_plugin_manager()
        self.adapted = sorted(pm.add_adapters(models, options)[component])
        groups = pm.trainable_parameters(models, options)
        if before_optimizer is not None:
            before_optimizer()
        optimizer, _ = optimizers.build(TRAINER_ADAMW, groups, lambda lr: [lr] * 1001)
        loss.set_train(True)
        _, self.train_step = build_steps(loss, optimizer, 1.0, 1)
        self.inputs = tuple(inputs)
        self.trainable = sum(int(p.size) for g in groups for p in g["params"])
        self.lora_dtypes = sorted({str(p.dtype) for g in groups for p in g["params"]})

    def _run(self) -> float:
        return float(self.train_step(*self.inputs).asnumpy())


def torch_threads(threads=None):
    """Import torch, set its thread count when given and seed it; return the module."""
    import torch

    if threads:
        torch.set_num_threads(int(threads))
    torch.manual_seed(0)
    return torch


class TorchLoraStep(LoraStep):
    """The reference side: torch + Hugging Face diffusers + peft (``add_adapter(LoraConfig)``), ``torch.optim.AdamW``
    with the same hyper-parameters as :class:`MindSporeLoraStep`."""

    def _attach(self, torch, model, *, rank: int, alpha: float, targets, lr: float, checkpointing: bool = False):
        from peft import LoraConfig

        model.requires_grad_(False)
        model.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                     target_modules=list(targets)))
        if checkpointing:
            model.enable_gradient_checkpointing()
        model.train()
        self.torch, self.model = torch, model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
        self.adapted = sorted(n.rsplit(".lora_A", 1)[0] for n, _ in model.named_modules() if n.endswith(".lora_A"))
        self.trainable = sum(p.numel() for p in self.params)
        self.extra_info = {"threads": torch.get_num_threads()}

    def _update(self, loss) -> float:
        loss.backward()
        self.torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.item())


def torch_unet_loss(unet, b: dict):
    """The denoising loss of the UNet benchmarks in torch: noised latents, UNet, per-sample-weighted MSE (SDXL: with
    ``pooled`` and ``time_ids`` in ``b``, passed as the added conditioning)."""
    noisy = b["a"].reshape(-1, 1, 1, 1) * b["latents"] + b["s"].reshape(-1, 1, 1, 1) * b["noise"]
    added = {"added_cond_kwargs": {"text_embeds": b["pooled"], "time_ids": b["time_ids"]}} if "pooled" in b else {}
    pred = unet(noisy, b["t"], encoder_hidden_states=b["embeds"], return_dict=False, **added)[0]
    return (((pred.float() - b["noise"]) ** 2).mean(dim=(1, 2, 3)) * b["weights"]).mean()


def compare_steps(module: str, ms_args: list, torch_args: list, *, reps: int, warmup: int, same_loss: bool = False,
                  default_threads_budget: float | None = None) -> tuple[dict, dict]:
    """MindSpore (``module.MindSporeStep(*ms_args)``) against torch at its default thread count and with one thread
    (``module.TorchStep(*torch_args, targets[, 1])``), each in its own :class:`Worker`, steps interleaved.

    Checks that both adapted the same modules and parameter count (and, with ``same_loss``, the same first loss);
    the default-threads torch configuration stops being sampled once its steps add up to
    ``default_threads_budget`` seconds. Returns ``(times, infos)``, keyed ``mindspore``, ``torch``, ``torch 1
    thread``."""
    workers = {}
    try:
        workers["mindspore"] = Worker(module, "MindSporeStep", *ms_args, env=MINDSPORE_ENV)
        ref = workers["mindspore"].info
        targets = ref["modules"]
        workers["torch"] = Worker(module, "TorchStep", *torch_args, targets)
        workers["torch 1 thread"] = Worker(module, "TorchStep", *torch_args, targets, 1)
        for name in ("torch", "torch 1 thread"):
            info = workers[name].info
            if sorted(info["modules"]) != sorted(targets) or info["trainable"] != ref["trainable"]:
                raise AssertionError(f"{name} adapted {len(info['modules'])} modules / {info['trainable']} "
                                     f"parameters, MindSpore {len(targets)} / {ref['trainable']}")
            if same_loss and abs(info["loss"] - ref["loss"]) > 1e-4 * max(1.0, abs(ref["loss"])):
                raise AssertionError(f"first loss: {name} {info['loss']:.6f}, MindSpore {ref['loss']:.6f} (the same "
                                     "weights and inputs must give the same loss)")
        for _ in range(warmup):
            for w in workers.values():
                w.step()
        names = list(workers)
        times = {n: [] for n in names}
        for r in range(reps):
            for n in (names if r % 2 == 0 else names[::-1]):
                if n == "torch" and default_threads_budget is not None and sum(times[n]) > default_threads_budget:
                    continue
                times[n].append(workers[n].step())
    finally:
        for w in workers.values():
            w.close()
    return times, {n: w.info for n, w in workers.items()}


def print_step_comparison(what: str, times: dict, infos: dict) -> tuple[float, str]:
    """The table of :func:`compare_steps`'s result; returns (MindSpore median ÷ the faster torch's, that one's
    name)."""
    med = {n: median(t) for n, t in times.items()}
    ms_s = med["mindspore"]
    best = min(("torch", "torch 1 thread"), key=lambda n: med[n])
    rows = [["MindSpore GRAPH_MODE (CPU backend)", fmt_s(ms_s), fmt_s(min(times["mindspore"])),
             fmt_s(infos["mindspore"]["first_step_s"]), len(times["mindspore"]), "1.00"]]
    for n, label in (("torch", f"torch + diffusers + peft ({infos['torch']['threads']} threads, default)"),
                     ("torch 1 thread", "torch + diffusers + peft (1 thread)")):
        rows.append([label, fmt_s(med[n]), fmt_s(min(times[n])), fmt_s(infos[n]["first_step_s"]), len(times[n]),
                     f"{ms_s / med[n]:.2f}"])
    print_table([what, "median", "min", "first step", "steps timed", "MindSpore ÷ this"], rows)
    return ms_s / med[best], best
