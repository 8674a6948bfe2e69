"""Benchmark 7 — latent/text caches and aspect-ratio buckets in ``mindone-lora train``.

1. One epoch's loop time (batch preparation + VAE/text encoding or cache look-ups + the compiled step) with
   ``--cache_latents --cache_text_encoder_outputs`` vs without, on the tiny SD1.x model in GRAPH_MODE on CPU, both
   trainers set up through ``Trainer.run`` and, after a warm-up epoch, driven step by step in alternation (ABBA), an
   epoch's time being the sum of its steps (target ≤ 0.8×); plus each step's two halves (batch inputs: VAE encode and
   text encoder or cache look-ups; the compiled step), which bound what a cache can save on this model.
2. Context for real sizes: the VAE encode time per image at 512 px on a full-size SD1.5 VAE built from its published
   config (random weights, nothing downloaded) vs reading that image's cached latent back from a safetensors file.
3. A bucketed run (``--enable_bucket``, images in two 16×64 / 64×16 buckets) vs a square run (32×32): the same pixel
   count per image; steps per second after each shape's first step, the two runs alternating step by step, the
   bucketed one in its own shuffled batch order (target ≥ 0.9×); medians per latent shape as context.

    python benchmarks/bench_7_caches_buckets.py [--reps N] [--cache_resolution PX] [--caches_only]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

SD15_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
                block_out_channels=(128, 256, 512, 512), sample_size=512, scaling_factor=0.18215,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)


def _trainer(argv):
    """A Trainer set up by ``run()`` (models, data, caches, compiled step), stopped just before its loop."""
    from mindone_lora_plugin.cli import COMMANDS, build_parser
    from mindone_lora_plugin.train.trainer import Trainer

    args = build_parser({"train": COMMANDS["train"]}).parse_args(["train", *argv])
    trainer = Trainer(args)
    trainer.train_loop = lambda start: trainer  # run() ends by calling train_loop(start): keep the trainer instead
    return trainer.run()


class Arm:
    """One side of a comparison: a trainer driven one training step (batch inputs + compiled update) at a time,
    through its epochs in order, exactly as the loop feeds it."""

    def __init__(self, trainer):
        self.t, self.epoch_no, self.index, self.micro = trainer, 0, 0, 0
        self.parts = {"batch inputs": [], "compiled step": []}  # the two halves of every step, in seconds

    def step(self) -> float:
        """Seconds of the next step; the shape of its latents is kept in ``last_shape``."""
        t0 = time.perf_counter()
        inputs = self.t.micro_inputs(self.epoch_no, self.index, self.micro)
        t1 = time.perf_counter()
        self.t.update_step(*inputs).asnumpy()
        t2 = time.perf_counter()
        dt = t2 - t0
        self.parts["batch inputs"].append(t1 - t0)
        self.parts["compiled step"].append(t2 - t1)
        self.last_shape = tuple(inputs[0].shape)
        self.micro += 1
        self.index += 1
        if self.index == self.t.plan.batches_per_epoch:
            self.epoch_no, self.index = self.epoch_no + 1, 0
        return dt

    def epoch(self) -> list[float]:
        """Seconds of each remaining step of the current epoch."""
        out = [self.step()]
        while self.index:
            out.append(self.step())
        return out


def interleave_steps(arms: dict, rounds: int) -> dict[str, list[float]]:
    """``rounds`` steps of every arm, alternating step by step in ABBA order (A B, B A, A B, ...), so that a load
    change on the machine hits both sides within one step's time. Returns name → seconds of each step."""
    names = list(arms)
    times = {n: [] for n in names}
    for r in range(rounds):
        for n in (names if r % 2 == 0 else names[::-1]):
            times[n].append(arms[n].step())
    return times


def epoch_sums(steps: list[float], per_epoch: int) -> list[float]:
    """Per-step seconds → loop seconds of each whole epoch."""
    return [sum(steps[i:i + per_epoch]) for i in range(0, len(steps) - per_epoch + 1, per_epoch)]


def bench_caches(tmp: str, reps: int, resolution: int = 32) -> dict:
    from mindone_lora_plugin.architectures.sd.tiny import ensure_tiny_model
    from mindone_lora_plugin.demo.training import make_shapes_dataset

    model = ensure_tiny_model("sd1", os.path.join(tmp, "tiny-sd1"))
    data = make_shapes_dataset(os.path.join(tmp, f"shapes{resolution}"), size=resolution, repeats=2)
    common = ["--pretrained_model_name_or_path", model, "--train_data_dir", data, "--train_batch_size", "2",
              "--report_to", "none", "--device_target", "CPU", "--mode", "graph", "--seed", "0",
              "--center_crop", "--random_flip", "--lr_warmup_steps", "0", "--resolution", str(resolution)]
    arms = {"uncached": Arm(_trainer(common + ["--output_dir", os.path.join(tmp, f"o1-{resolution}")])),
            "cached": Arm(_trainer(common + ["--output_dir", os.path.join(tmp, f"o2-{resolution}"), "--cache_latents",
                                             "--cache_text_encoder_outputs"]))}
    for arm in arms.values():
        arm.epoch()  # warm-up: compiles
    per_epoch = arms["cached"].t.plan.batches_per_epoch
    for arm in arms.values():
        arm.parts = {k: [] for k in arm.parts}  # the warm-up's compile is not a part
    steps = interleave_steps(arms, reps * per_epoch)
    # where the time goes, from the same interleaved steps: batch inputs (uncached: VAE encode + text encoder +
    # host work; cached: look-ups + host work) and the compiled step
    parts = {f"{side} {k}": v for side, arm in arms.items() for k, v in arm.parts.items()}
    return {"steps": steps, "epochs": {k: epoch_sums(v, per_epoch) for k, v in steps.items()},
            "steps_per_epoch": per_epoch, "parts": parts}


def bench_vae(tmp: str, reps: int) -> dict:
    import mindspore as ms
    import numpy as np
    from mindone.diffusers import AutoencoderKL

    from mindone_lora_plugin.train.data.cache import LatentCache
    from mindone_lora_plugin.train.data.loader import Example
    from mindone_lora_plugin.train.step import VaeEncode

    vae = AutoencoderKL(**SD15_VAE)
    vae.set_train(False)
    cell = VaeEncode(vae)
    x = np.random.default_rng(0).uniform(-1, 1, (1, 3, 512, 512)).astype(np.float32)
    encode = lambda p: cell(ms.Tensor(p)).asnumpy()  # noqa: E731
    encode(x)  # compile
    folder = os.path.join(tmp, "vae-cache")
    os.makedirs(folder, exist_ok=True)
    img = ((x[0].transpose(1, 2, 0) + 1) * 127.5).astype(np.uint8)
    ex = Example(img, (512, 512), ["x"], (512, 512), "k" * 32)
    LatentCache(encode, "v", folder, 1).fill([ex], flips=False)

    def read():
        cache = LatentCache(encode, "v", folder, 1)
        cache.fill([ex], flips=False)
        assert cache.stats["read"] == 1

    return {"times": C.interleave({"encode 512 px": lambda: encode(x), "read cached latent": read}, reps)}


def bench_buckets(tmp: str, reps: int) -> dict:
    import numpy as np
    from PIL import Image

    from mindone_lora_plugin.architectures.sd.tiny import ensure_tiny_model

    model = ensure_tiny_model("sd1", os.path.join(tmp, "tiny-sd1"))
    rng = np.random.default_rng(0)
    folders = {}
    for name, sizes in (("square", [(32, 32)] * 8), ("buckets", [(64, 16)] * 4 + [(16, 64)] * 4)):
        sub = os.path.join(tmp, name, "1_thing")
        os.makedirs(sub, exist_ok=True)
        for i, (w, h) in enumerate(sizes):
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(os.path.join(sub, f"{i}.png"))
        folders[name] = os.path.join(tmp, name)
    common = ["--pretrained_model_name_or_path", model, "--train_batch_size", "2", "--report_to", "none",
              "--device_target", "CPU", "--mode", "graph", "--seed", "0", "--resolution", "32", "--center_crop",
              "--cache_latents", "--cache_text_encoder_outputs"]
    arms = {
        "square 32x32": Arm(_trainer(common + ["--train_data_dir", folders["square"], "--output_dir",
                                               os.path.join(tmp, "ob1")])),
        "buckets 16x64 + 64x16": Arm(_trainer(common + ["--train_data_dir", folders["buckets"], "--output_dir",
                                                        os.path.join(tmp, "ob2"), "--enable_bucket",
                                                        "--min_bucket_reso", "16", "--max_bucket_reso", "64",
                                                        "--bucket_reso_steps", "16"]))}
    first = {k: v.epoch() for k, v in arms.items()}  # every shape's first step (compile) happens here
    per_epoch = arms["square 32x32"].t.plan.batches_per_epoch
    names = list(arms)
    times, by_shape = {k: [] for k in names}, {}
    for r in range(reps * per_epoch):  # step by step, ABBA; the bucketed side in its plan's (shuffled) order
        for k in (names if r % 2 == 0 else names[::-1]):
            times[k].append(arms[k].step())
            if k != "square 32x32":
                by_shape.setdefault("x".join(map(str, arms[k].last_shape[2:])), []).append(times[k][-1])
    return {"times": times, "first_epoch": first, "bucketed_by_latent_shape": by_shape}


def run(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=5, help="epochs per side after the warm-up epoch (interleaved step by "
                                                        "step with the other side)")
    ap.add_argument("--cache_resolution", type=int, default=32,
                    help="training resolution of the cache comparison (32: the tiny model's own; 64 gives the VAE "
                         "and the UNet four times the pixels)")
    ap.add_argument("--caches_only", action="store_true", help="only the cache comparison (no buckets, no VAE)")
    opts = ap.parse_args(argv)
    from mindone_lora_plugin.runtime.process import quiet_mindone_imports, setup

    quiet_mindone_imports()
    setup("CPU", "graph", seed=0)
    C.banner("Benchmark 7: latent/text caches and aspect-ratio buckets")
    C.print_machine()
    t_start = time.perf_counter()
    tmp = C.workdir("bench7")
    res = opts.cache_resolution
    caches = bench_caches(tmp, opts.reps, res)
    buckets = None if opts.caches_only else bench_buckets(tmp, opts.reps)
    vae = None if opts.caches_only else bench_vae(tmp, max(3, opts.reps))
    m = {k: C.median(v) for k, v in caches["epochs"].items()}
    ratio = m["cached"] / m["uncached"]
    step_ratio = C.median(caches["steps"]["cached"]) / C.median(caches["steps"]["uncached"])
    p = {k: C.median(x) for k, x in caches["parts"].items()}
    print(f"one epoch = {caches['steps_per_epoch']} steps of batch 2 at {res} px (tiny SD1.x, GRAPH_MODE, CPU); the "
          f"two sides alternate step by step (ABBA), {opts.reps} epochs each after a warm-up epoch; medians\n")
    rows = [["epoch loop: cached (A) vs uncached (B)", C.fmt_s(m["cached"]), C.fmt_s(m["uncached"]), f"{ratio:.3f}",
             "≤ 0.8", C.verdict(ratio <= 0.8)],
            ["one step: cached (A) vs uncached (B)", C.fmt_s(C.median(caches["steps"]["cached"])),
             C.fmt_s(C.median(caches["steps"]["uncached"])), f"{step_ratio:.3f}", "context", "—"]]
    if buckets is not None:
        sq, bk = C.median(buckets["times"]["square 32x32"]), C.median(buckets["times"]["buckets 16x64 + 64x16"])
        v = {k: C.median(x) for k, x in vae["times"].items()}
        rows += [["steps/s: bucketed 16x64+64x16 (A) vs square 32x32 (B)", f"{1 / bk:.2f}", f"{1 / sq:.2f}",
                  f"{sq / bk:.3f}", "≥ 0.9", C.verdict(sq / bk >= 0.9)],
                 ["full-size SD1.5 VAE, one 512 px image: encode (A) vs read its cached latent (B)",
                  C.fmt_s(v["encode 512 px"]), C.fmt_s(v["read cached latent"]),
                  f"{v['encode 512 px'] / v['read cached latent']:.0f}", "context", "—"]]
    C.print_table(["measure", "A", "B", "ratio A/B", "target", "result"], rows)
    removed = p["uncached batch inputs"] - p["cached batch inputs"]
    step = (p["uncached compiled step"] + p["cached compiled step"]) / 2
    best = (step + p["cached batch inputs"]) / (step + p["uncached batch inputs"])
    print("\nwhere a step goes (medians of the same interleaved steps): " + ", ".join(f"{k} {C.fmt_s(x)}"
                                                                                    for k, x in p.items())
          + f"; the caches remove {C.fmt_s(removed)} of an uncached step's {C.fmt_s(step + p['uncached batch inputs'])}"
          f" (VAE encode + text encoder), so the compiled step bounds the cached/uncached ratio at {best:.3f} here")
    if buckets is not None:
        shapes = ", ".join(f"{k}: {C.fmt_s(C.median(x))}" for k, x in buckets["bucketed_by_latent_shape"].items())
        print(f"bucketed steps by latent shape (medians): {shapes}; square: {C.fmt_s(sq)}")
        firsts = ", ".join(f"{k}: {C.fmt_s(max(x))}" for k, x in buckets["first_epoch"].items())
        print(f"\nslowest step of the first epoch (each shape's compile): {firsts}")
    print(f"RATIO epoch cached/uncached = {ratio:.3f} (target ≤ 0.8): {C.verdict(ratio <= 0.8)}")
    if buckets is not None:
        print(f"RATIO steps/s bucketed/square = {sq / bk:.3f} (target ≥ 0.9): {C.verdict(sq / bk >= 0.9)}")
    print(f"benchmark 7 took {time.perf_counter() - t_start:.0f} s", flush=True)
    C.save_results("bench_7" if buckets is not None else f"bench_7_caches_{res}",
                   {"caches": caches, "buckets": buckets, "vae": vae, "machine": C.machine()})
    return 0


if __name__ == "__main__":
    sys.exit(C.run_main(run))
