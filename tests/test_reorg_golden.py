"""A fixed-seed tiny training run writes the same tensors and metadata as before the family/registry
reorganisation (issue #27): ``tests/data/golden_runs.json`` was recorded from the code before it changed.

Recorded per run: every written file's tensor names, shapes, dtypes and float64 sums (of values and of absolute
values), and its metadata with the fields that differ from run to run (times, paths, the session id) left out and
the file hashes (``sshs_*``, of the tensors compared within float tolerance) left to the tensor sums.
Regenerate only for an intended behaviour change: ``python tests/test_reorg_golden.py record``.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.slow

GOLDEN = os.path.join(os.path.dirname(__file__), "data", "golden_runs.json")
VOLATILE = ("ss_training_started_at", "ss_training_finished_at", "ss_session_id", "ss_output_name",
            "ss_training_comment", "modelspec.date", "ss_dataset_dirs", "ss_output_dir")

RUNS = {
    "sd1": ("sd1", ["--lora_alpha", "8", "--train_text_encoder", "--save_formats", "diffusers,kohya"]),
    "sdxl": ("sdxl", ["--lora_alpha", "2", "--lora_targets", "kohya"]),
    "flux": ("flux", ["--resolution", "32", "--timestep_sampling", "logit_normal", "--guidance_scale", "3.5"]),
}


def _summary(path: str) -> dict:
    from mindone_lora_plugin import safetensors_io

    tensors, meta = safetensors_io.load(path)
    out = {}
    for name in sorted(tensors):
        a = np.asarray(tensors[name]).astype(np.float64)
        out[name] = [list(a.shape), str(np.asarray(tensors[name]).dtype), float(a.sum()), float(np.abs(a).sum())]
    keep = {k: v for k, v in sorted((meta or {}).items()) if k not in VOLATILE and not k.startswith("sshs_")}
    if "mindone_lora.training_args" in keep:  # paths of this run's folders: their names only
        args = json.loads(keep["mindone_lora.training_args"])
        keep["mindone_lora.training_args"] = {k: os.path.basename(v) if isinstance(v, str) and os.sep in v else v
                                              for k, v in args.items()}
    return {"tensors": out, "metadata": keep}


def run_all(models: dict, data: str, tmp: str) -> dict:
    from mindone_lora_plugin.cli import main

    found = {}
    for run, (family, extra) in RUNS.items():
        out = os.path.join(tmp, run)
        code = main(["train", "--pretrained_model_name_or_path", models[family], "--train_data_dir", data,
                     "--output_dir", out, "--max_train_steps", "2", "--train_batch_size", "2",
                     "--learning_rate", "1e-3", "--lr_warmup_steps", "0", "--seed", "3", "--report_to", "none",
                     "--device_target", "CPU", "--mode", "pynative", "--checkpointing_steps", "0",
                     "--output_name", "golden", *extra])
        assert code == 0
        found[run] = {f: _summary(os.path.join(out, f)) for f in sorted(os.listdir(out)) if f.endswith(".safetensors")}
    return found


def _models(tmp: str) -> tuple[dict, str]:
    from mindone_lora_plugin.architectures.flux.tiny import ensure_tiny_model as ensure_tiny_flux
    from mindone_lora_plugin.architectures.sd.tiny import ensure_tiny_model
    from mindone_lora_plugin.demo.training import make_shapes_dataset

    models = {f: ensure_tiny_model(f, os.path.join(tmp, f"tiny-{f}")) for f in ("sd1", "sdxl")}
    models["flux"] = ensure_tiny_flux("dev", os.path.join(tmp, "tiny-flux"))
    return models, make_shapes_dataset(os.path.join(tmp, "shapes"), size=40, repeats=1)


def test_fixed_seed_runs_write_the_recorded_tensors_and_metadata(tmp_path):
    models, data = _models(str(tmp_path))
    got = run_all(models, data, str(tmp_path))
    want = json.load(open(GOLDEN))
    for run in want:
        assert sorted(got[run]) == sorted(want[run]), run
        for f, summary in want[run].items():
            assert got[run][f]["metadata"] == summary["metadata"], (run, f)
            assert sorted(got[run][f]["tensors"]) == sorted(summary["tensors"]), (run, f)
            for name, (shape, dtype, total, absolute) in summary["tensors"].items():
                g = got[run][f]["tensors"][name]
                assert g[:2] == [shape, dtype], (run, f, name)
                np.testing.assert_allclose(g[2:], [total, absolute], rtol=1e-5, atol=1e-6, err_msg=f"{run} {f} {name}")


if __name__ == "__main__" and sys.argv[1:] == ["record"]:
    import tempfile

    from mindone_lora_plugin.runtime.process import launch_synchronously

    launch_synchronously("CPU")
    with tempfile.TemporaryDirectory() as tmp:
        models, data = _models(tmp)
        result = run_all(models, data, tmp)
    with open(GOLDEN, "w") as f:
        json.dump(result, f, indent=1, sort_keys=True)
        f.write("\n")
