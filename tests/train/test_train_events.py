"""`mindone-lora train` writes train_log.jsonl as it goes and stops gracefully on SIGTERM: a checkpoint first, then
the "stopped" event and exit status 0; a resume continues from that checkpoint to "finished"."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from mindone_lora_plugin.train.events import read_events

pytestmark = pytest.mark.slow


def test_sigterm_checkpoints_then_stops_and_resume_finishes(tiny_sd1, tmp_path):
    from mindone_lora_plugin.demo.training import make_shapes_dataset

    data = make_shapes_dataset(str(tmp_path / "data"), size=32, repeats=1)
    out = str(tmp_path / "run")
    argv = [sys.executable, "-m", "mindone_lora_plugin.cli", "train", "--pretrained_model_name_or_path", tiny_sd1,
            "--train_data_dir", data, "--output_dir", out, "--max_train_steps", "50", "--train_batch_size", "1",
            "--lr_warmup_steps", "0", "--checkpointing_steps", "1000", "--report_to", "none", "--device_target", "CPU",
            "--mode", "pynative", "--seed", "1"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        end = time.time() + 300
        while not any(e["event"] == "step" for e in read_events(out)):
            assert proc.poll() is None and time.time() < end, proc.stderr.read() if proc.poll() is not None else ""
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    events = read_events(out)
    assert events[0]["event"] == "start" and events[0]["total_steps"] == 50 and events[0]["pid"] == proc.pid
    assert events[-1]["event"] == "stopped"
    stopped = events[-1]["step"]
    assert 1 <= stopped < 50 and os.path.isfile(os.path.join(out, f"checkpoint-{stopped}", "trainer_state.json"))
    steps = [e for e in events if e["event"] == "step"]
    assert [e["step"] for e in steps] == list(range(1, stopped + 1)) and all(e["loss"] > 0 for e in steps)
    assert not os.path.exists(os.path.join(out, "pytorch_lora_weights.safetensors"))  # stopped, not finished

    argv[argv.index("--max_train_steps") + 1] = str(stopped + 1)
    done = subprocess.run(argv + ["--resume_from_checkpoint", "latest"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    events = read_events(out)
    assert events[-1] == dict(events[-1], event="finished", step=stopped + 1)
    assert [e["step"] for e in events if e["event"] == "start"] == [0, stopped]


def test_a_failed_run_is_recorded(tmp_path, tiny_sd1):
    from mindone_lora_plugin.train.events import RunEvents, record_failure

    RunEvents(str(tmp_path)).start(0, 10)
    record_failure(str(tmp_path), ValueError("the loss became nan\nat step 3"))
    last = read_events(str(tmp_path))[-1]
    assert last["event"] == "failed" and last["message"] == "the loss became nan at step 3"
    record_failure(str(tmp_path), ValueError("again"))  # an ended run is not ended twice
    assert len(read_events(str(tmp_path))) == 2
    record_failure(str(tmp_path / "never-started"), ValueError("x"))
    assert not os.path.exists(tmp_path / "never-started")
