"""Two-worker data parallel training under MindSpore's own launcher (msrun) on CPU."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("algo", ["lora", "flux-loha"])
def test_two_workers_keep_identical_weights_and_only_rank0_writes(algo, request, tmp_path):
    """``lora``: plain LoRA on the tiny SD1 UNet; ``flux-loha``: LoHa (LyCORIS plugin) on the attention outputs of
    the tiny FLUX.1 dev transformer (32 px; the modules the kohya layout keeps unfused)."""
    from mindone_lora_plugin.demo.training import make_shapes_dataset

    if algo == "flux-loha":
        from mindone_lora_plugin.architectures.flux.tiny import ensure_tiny_model

        model, algo = ensure_tiny_model("dev", str(tmp_path / "tiny-flux")), "loha"
        extra = ["--resolution", "32", "--lora_targets", "to_out.0,to_add_out"]
    else:
        model, extra = request.getfixturevalue("tiny_sd1"), []

    bindir = os.path.dirname(sys.executable)
    msrun = shutil.which("msrun", path=bindir) or shutil.which("msrun")
    entry = shutil.which("mindone-lora", path=bindir)
    assert msrun and entry, "msrun and mindone-lora must be installed in the test environment"
    data = make_shapes_dataset(str(tmp_path / "shapes"), size=40, repeats=1)
    out, logs = tmp_path / "out", tmp_path / "logs"
    env = dict(os.environ, PATH=bindir + os.pathsep + os.environ.get("PATH", ""))
    port = 8200 + os.getpid() % 700
    cmd = [msrun, "--worker_num=2", "--local_worker_num=2", f"--master_port={port}", f"--log_dir={logs}",
           "--join=True", entry, "train", "--distributed", "--pretrained_model_name_or_path", model,
           "--train_data_dir", data, "--output_dir", str(out), "--max_train_steps", "2", "--train_batch_size", "2",
           "--mode", "pynative", "--report_to", "none", "--checkpointing_steps", "1", "--device_target", "CPU",
           "--seed", "1", "--learning_rate", "1e-2", "--lora_algo", algo, *extra]
    if algo != "lora":  # the diffusers layout holds plain LoRA only
        cmd += ["--save_formats", "kohya"]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    worker_logs = "".join(p.read_text(errors="replace") for p in sorted(logs.glob("worker_*.log")))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + worker_logs[-3000:]
    digests = dict(re.findall(r"worker (\d)/2: LoRA weights sha256 ([0-9a-f]{64})", worker_logs))
    assert set(digests) == {"0", "1"}, worker_logs[-2000:]
    assert digests["0"] == digests["1"]
    files = ["out.safetensors"] + (["pytorch_lora_weights.safetensors"] if algo == "lora" else [])
    assert sorted(os.listdir(out)) == sorted(["checkpoint-1", "checkpoint-2", "hparams.yml", "loss_curve.png",
                                              "train_log.jsonl", *files])
    from mindone_lora_plugin.formats.reader import read_lora

    state = read_lora(str(out / "out.safetensors"))
    assert set(state.algorithms()) == {algo} and len(state) >= 2
    assert state.architecture == ("flux" if "--lora_targets" in extra else "sd1")
    first = re.findall(r"training 2 steps .* 2 worker\(s\)", worker_logs)
    assert len(first) == 1  # only rank 0 talks
