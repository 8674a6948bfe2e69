"""`mindone-lora ui` without a browser: path confinement, auth and host refusals, the form built from the train
parser, validation with the CLI's checks, TOML configs, the run log reader and the JSON API over real HTTP."""

from __future__ import annotations

import base64
import json
import os
import time
import tomllib
import urllib.error
import urllib.request

import pytest

from mindone_lora_plugin.cli import main
from mindone_lora_plugin.errors import LoraError
from mindone_lora_plugin.ui import form
from mindone_lora_plugin.ui.paths import PathGuard


@pytest.fixture
def tree(tmp_path):
    root, allowed, outside = tmp_path / "root", tmp_path / "models", tmp_path / "secret"
    for d in (root, allowed, outside):
        d.mkdir()
    (outside / "key.txt").write_text("secret")
    (root / "notes.txt").write_text("hello")
    os.symlink(outside, root / "link-out")
    return root, allowed, outside


def test_paths_are_confined(tree):
    root, allowed, outside = tree
    g = PathGuard(str(root), [str(allowed)])
    assert g.resolve("notes.txt") == str(root / "notes.txt")
    assert g.resolve(str(allowed / "x")) == str(allowed / "x")
    for bad in ("../secret/key.txt", str(outside / "key.txt"), "link-out/key.txt", "/etc/passwd",
                str(root) + "/../secret", str(allowed) + "-other"):
        with pytest.raises(LoraError, match="outside the allowed folders"):
            g.resolve(bad)
    with pytest.raises(LoraError, match="does not exist"):
        g.resolve("missing", must_exist=True)


def test_binding_elsewhere_needs_a_long_password(tree, capsys, tmp_path, monkeypatch):
    root = str(tree[0])
    assert main(["ui", "--host", "0.0.0.0", "--root", root]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--auth" in err and "0.0.0.0" in err
    assert main(["ui", "--host", "0.0.0.0", "--root", root, "--auth", "alice:short"]) == 2
    assert "at least 12 characters" in capsys.readouterr().err
    assert main(["ui", "--root", str(tree[0] / "nope")]) == 2
    assert "no such folder" in capsys.readouterr().err
    # the password from a file (never only argv): it binds, and says that auth is on
    import signal
    import subprocess
    import sys

    secret = tmp_path / "auth.txt"
    secret.write_text("alice:a-long-passphrase\n")
    proc = subprocess.Popen([sys.executable, "-m", "mindone_lora_plugin.cli", "ui", "--host", "0.0.0.0", "--port", "0",
                             "--root", root, "--auth_file", str(secret)], stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(20)
        proc.stdout.close()
    assert "http://0.0.0.0:" in line and "?token=" in line and "auth on (HTTP Basic, user alice)" in line
    assert "passphrase" not in line
    # or from the environment; argv wins over both
    import argparse

    from mindone_lora_plugin.commands.ui import AUTH_ENV, add_parser, auth_of

    parser = add_parser(argparse.ArgumentParser().add_subparsers())
    monkeypatch.setenv(AUTH_ENV, "bob:another-long-one")
    assert auth_of(parser.parse_args(["--host", "0.0.0.0"])) == "bob:another-long-one"
    assert auth_of(parser.parse_args(["--auth", "carol:x"])) == "carol:x"
    monkeypatch.setenv(AUTH_ENV, "no-colon")
    with pytest.raises(LoraError, match=f"{AUTH_ENV} needs USER:PASSWORD"):
        auth_of(parser.parse_args([]))


def test_form_follows_the_parser_and_config_round_trips(tree, tiny_sd1):
    s = form.schema()
    titles = [g["title"] for g in s["groups"]]
    assert titles[-1] == "plugins" and "LoRA" in titles
    dests = {f["dest"]: f for g in s["groups"] for f in g["fields"]}
    assert dests["lora_rank"]["kind"] == "int" and dests["lr_scheduler"]["kind"] == "choice"
    assert "push_to_hub" not in dests and "demo" not in dests  # refused and UI-only flags stay out
    assert {"SD1.x quick", "SDXL", "DreamBooth"} <= set(s["presets"])
    # plugin flags name their algorithm, architecture or strategy: the page shows them only while it is chosen
    scopes = {f["dest"]: f["scope"] for g in s["groups"] for f in g["fields"] if f["scope"]}
    assert scopes["lokr_factor"] == ["algorithm", ["lokr"]]
    assert scopes["timestep_sampling"] == ["architecture", ["flux"]]
    assert scopes["lora_fa_init"] == ["strategy", ["lora-fa"]] and "lora_alpha" not in scopes
    assert "flux" not in scopes["snr_gamma"][1] and "sdxl" in scopes["snr_gamma"][1]  # FLUX ignores it
    assert s["architectures"]["sdxl"] == "SDXL"
    # the ways of giving the images: the DreamBooth group shows only with its own; a flag shows with the one it needs
    assert [x["dest"] for x in s["sources"]] == list(form.DATA_FIELDS)
    assert s["sources"][2]["label"].startswith("DreamBooth: ")
    assert dests["instance_prompt"]["source"] == "instance_data_dir" and dests["train_data_dir"]["source"] == \
        "train_data_dir" and dests["resolution"]["source"] is None
    assert dests["min_bucket_reso"]["needs"] == "enable_bucket" and dests["class_data_dir"]["needs"] == \
        "with_prior_preservation" and dests["lora_rank"]["needs"] is None
    assert dests["lora_strategy"]["kind"] == "choice" and dests["lora_strategy"]["fits"]["sdxl"] == ["sdxl"]
    assert {"lora", "lokr"} <= set(dests["lora_algo"]["choices"])
    root, allowed, _ = tree
    from mindone_lora_plugin.demo.training import make_shapes_dataset

    data = make_shapes_dataset(str(root / "data"), size=16, repeats=1)
    g = PathGuard(str(root), [os.path.dirname(tiny_sd1)])
    values = dict(pretrained_model_name_or_path=tiny_sd1, train_data_dir="data", output_dir="runs/one",
                  train_batch_size="2", lora_rank="8", learning_rate="2e-4", random_flip=True,
                  validation_prompt="a 'red' circle")
    errors, argv = form.validate(values, g)
    assert errors == {} and argv[argv.index("--train_data_dir") + 1] == data
    cfg = tomllib.loads(form.to_toml(argv))
    assert cfg["lora_rank"] == 8 and cfg["learning_rate"] == 2e-4 and cfg["random_flip"] is True
    assert cfg["validation_prompt"] == "a 'red' circle" and cfg["output_dir"] == str(root / "runs" / "one")
    # one message per mistake, beside its field
    bad = dict(values, pretrained_model_name_or_path=str(root / "no-model"), train_data_dir="../secret",
               lora_rank="four", lr_scheduler="sometimes")
    errors, argv = form.validate(bad, g)
    assert argv is None and set(errors) == {"pretrained_model_name_or_path", "train_data_dir", "lora_rank",
                                            "lr_scheduler"}
    assert "does not exist" in errors["pretrained_model_name_or_path"]
    assert "outside the allowed folders" in errors["train_data_dir"] and "invalid int" in errors["lora_rank"]
    errors, _ = form.validate(dict(values, cache_dir="/etc", logging_dir="../../../x", output_name="../x",
                                   dataset_name="../secret"), g)
    assert set(errors) == {"cache_dir", "logging_dir", "output_name", "dataset_name"}
    # the folders a run writes into are never read-only ones (the shipped demo model's)
    ro = PathGuard(str(root), [os.path.dirname(tiny_sd1)], readonly=[str(allowed)])
    errors, _ = form.validate(dict(values, class_data_dir=str(allowed), with_prior_preservation=True), ro)
    assert "read-only" in errors["class_data_dir"]
    errors, _ = form.validate(dict(values, train_data_dir=str(allowed)), ro)
    assert "train_data_dir" not in errors or "read-only" not in errors["train_data_dir"]
    errors, _ = form.validate(dict(values, train_data_dir=str(allowed), cache_latents_to_disk=True), ro)
    assert "read-only" in errors["train_data_dir"]
    # the CLI's whole-run checks (train/flags/settings.py) land on the flag they name
    errors, _ = form.validate(dict(values, with_prior_preservation=True), g)
    assert list(errors) == ["with_prior_preservation"]
    errors, _ = form.validate(dict(values, save_formats="diffusers,nope"), g)
    assert "nope" in errors.get("save_formats", errors.get("_form", ""))


def test_event_log_reader_is_incremental(tmp_path):
    from mindone_lora_plugin.train.events import RunEvents
    from mindone_lora_plugin.ui.runs import EventTail

    ev = RunEvents(str(tmp_path))
    ev.start(0, 10)
    tail = EventTail(ev.path).update()
    assert tail.last_start["total_steps"] == 10 and tail.step == 0
    for s in range(1, 4):
        ev.step(s, 10, 1.0 / s, 1e-4)
    with open(ev.path, "a") as f:
        f.write('{"event": "step", "step": 4, "lo')  # a half-written line is left for later
    tail.update()
    assert sorted(tail.losses) == [1, 2, 3] and tail.step == 3 and tail.last_end is None
    with open(ev.path, "a") as f:
        f.write('ss": 0.2}\n')
    ev.write("val_loss", step=4, val_loss=0.5)
    ev.end("stopped", 4)
    tail.update()
    assert tail.losses[4] == 0.2 and tail.val_losses == {4: 0.5} and tail.last_end["event"] == "stopped"


TOKEN = "test-token-0123456789"


@pytest.fixture
def server(tree):
    from mindone_lora_plugin.ui.server import UIServer

    root, allowed, _ = tree

    def start(auth=None, allow=()):
        srv = UIServer(("127.0.0.1", 0), PathGuard(str(root), [str(allowed), *allow]), auth=auth, token=TOKEN)
        started.append(srv.start())
        return srv.url.rstrip("/")

    started = []
    yield start
    for srv in started:
        srv.shutdown()


def fetch(url, body=None, headers=None, token=TOKEN):
    data = None if body is None else json.dumps(body).encode()
    base = {"Content-Type": "application/json"} if body is not None else {}
    if token:
        base["X-UI-Token"] = token
    req = urllib.request.Request(url, data=data, headers=dict(base, **(headers or {})))
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)


@pytest.mark.smoke
def test_server_starts_and_wants_its_token(server):
    url = server()
    assert fetch(url + "/api/info", token=None)[0] == 401
    status, body, headers = fetch(url + "/api/info")
    assert status == 200 and json.loads(body)["auth"] is False
    assert "frame-ancestors 'none'" in headers["content-security-policy"]


def test_api_confines_files_and_requires_auth(server, tree):
    root, _, outside = tree
    url = server()
    status, body, _ = fetch(url + "/api/file?path=notes.txt")
    assert status == 200 and body == b"hello"
    for bad in ("../secret/key.txt", str(outside / "key.txt"), "link-out/key.txt", "%2e%2e/secret/key.txt"):
        status, body, _ = fetch(url + "/api/file?path=" + bad)
        assert status == 400 and b"outside the allowed folders" in body and b"secret\"" not in body
    status, body, _ = fetch(url + "/static/../server.py")
    assert status == 404
    status, body, _ = fetch(url + "/api/file?path=notes.txt", headers={"Host": "evil.example:80"})
    assert status == 403  # DNS rebinding: only loopback host names
    status, _, _ = fetch(url + "/api/run/stop", body=None)  # a GET on a POST action
    assert status == 405
    status, _, _ = fetch(url + "/api/inspect", headers={"Content-Type": "text/plain"}, body="x")
    assert status == 415  # no cross-site form posts

    url = server(auth="alice:a-long-passphrase")
    assert fetch(url + "/api/info")[0] == 401
    good = "Basic " + base64.b64encode(b"alice:a-long-passphrase").decode()
    assert fetch(url + "/api/info", headers={"Authorization": good})[0] == 200
    assert fetch(url + "/api/info", headers={"Authorization": good}, token=None)[0] == 401  # and the token
    wrong = "Basic " + base64.b64encode(b"alice:x").decode()
    import time

    t0 = time.perf_counter()
    assert fetch(url + "/api/info", headers={"Authorization": wrong})[0] == 401
    assert fetch(url + "/api/info", headers={"Authorization": wrong})[0] == 401
    assert time.perf_counter() - t0 >= 0.5 + 1.0  # a growing delay after each failure


def test_api_lora_tools(server, tree, tiny_sd1):
    """inspect, convert and merge through the commands' functions, every path confined."""
    import numpy as np

    from mindone_lora_plugin import safetensors_io

    root, allowed, outside = tree
    url = server(allow=[os.path.dirname(tiny_sd1)])
    # a tiny kohya file with tag frequencies, written as kohya does
    from mindone_lora_plugin.base_model_info import BaseModelInfo

    info = BaseModelInfo.from_folder(tiny_sd1)
    module = next(m for m in sorted(info.modules["unet"]) if m.endswith("attn1.to_q"))
    key, shape = "lora_unet_" + module.replace(".", "_"), info.modules["unet"][module]
    tensors = {f"{key}.lora_down.weight": np.ones((2, shape[1]), np.float32),
               f"{key}.lora_up.weight": np.zeros((shape[0], 2), np.float32), f"{key}.alpha": np.float32(2.0)}
    meta = {"ss_tag_frequency": json.dumps({"img": {"sks toy": 5, "red": 2}}), "ss_network_module": "networks.lora"}
    safetensors_io.save(tensors, str(allowed / "toy.safetensors"), meta)
    status, body, _ = fetch(url + "/api/inspect", {"path": str(allowed / "toy.safetensors")})
    r = json.loads(body)
    assert status == 200 and r["format"] == "kohya" and r["components"]["unet"]["ranks"] == [2]
    assert r["trigger_words"][0] == ["sks toy", 5] and r["algorithm"] == "lora"
    status, body, _ = fetch(url + "/api/convert", {"input": str(allowed / "toy.safetensors"), "output": "conv",
                                                   "to": "diffusers"})
    assert status == 200 and "wrote" in json.loads(body)["message"]
    assert os.path.isfile(root / "conv" / "pytorch_lora_weights.safetensors")
    status, body, _ = fetch(url + "/api/convert", {"input": str(allowed / "toy.safetensors"),
                                                   "output": str(outside / "x.safetensors"), "to": "kohya"})
    assert status == 400 and "outside the allowed folders" in json.loads(body)["error"]
    assert not os.path.exists(outside / "x.safetensors")
    status, body, _ = fetch(url + "/api/merge", {"to_lora": True, "out": "both.safetensors", "model": tiny_sd1,
                                                 "loras": [{"path": str(allowed / "toy.safetensors"), "weight": "0.5"},
                                                           {"path": "conv", "weight": "1"}]})
    assert status == 200 and "combined" in json.loads(body)["message"], body
    assert os.path.isfile(root / "both.safetensors")
    # generate with weighted LoRAs: the grid comes back; a missing prompt is one message
    lora = [{"path": str(allowed / "toy.safetensors"), "weight": "0.5"}, {"path": "conv", "weight": "0.5"}]
    status, body, _ = fetch(url + "/api/generate", {"model": tiny_sd1, "loras": lora, "prompt": "", "out": "gen"})
    assert status == 400 and "--prompt is required" in json.loads(body)["error"]
    seen, done = [], []  # the progress the page would poll while generate works

    def poll():
        while not done:
            seen.append(json.loads(fetch(url + "/api/progress")[1]))
            time.sleep(0.02)

    import threading
    import time

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        status, body, _ = fetch(url + "/api/generate", {"model": tiny_sd1, "loras": lora, "prompt": "a red circle",
                                                        "steps": "3", "num_images": "5", "seed": "3", "out": "gen",
                                                        "device_target": "CPU"})
    finally:
        done.append(True)
        poller.join()
    r = json.loads(body)
    assert status == 200 and r["grid"] == str(root / "gen" / "grid.png"), body
    assert any(p["running"] and p["action"] == "generate" for p in seen)  # answered while generate works
    steps = [(p["first"], p["step"]) for p in seen if p.get("phase") == "denoising"]
    assert all(0 <= s <= 3 for _, s in steps) and steps == sorted(steps)
    last = json.loads(fetch(url + "/api/progress")[1])  # the last report: the second batch's last step
    assert last == dict(last, running=False, action="generate", phase="done", step=3, steps=3, first=5, last=5,
                        images=5, fraction=1.0)
    from PIL import Image

    assert Image.open(r["grid"]).format == "PNG" and len(os.listdir(root / "gen")) == 6
    assert not _workers()  # the generate/merge worker process has exited


def _workers() -> list[int]:
    """This process's children that are UI workers (``python -P -m mindone_lora_plugin.ui.files``)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if ppid == os.getpid() and b"mindone_lora_plugin.ui.files" in cmdline:
            found.append(int(pid))
    return found


def test_api_saves_a_config_and_refuses_a_bad_run(server, tree, tiny_sd1):
    root, _, outside = tree
    from mindone_lora_plugin.demo.training import make_shapes_dataset

    make_shapes_dataset(str(root / "data"), size=16, repeats=1)
    url = server(allow=[os.path.dirname(tiny_sd1)])
    values = {"pretrained_model_name_or_path": tiny_sd1, "train_data_dir": "data", "output_dir": "runs/a",
              "max_train_steps": "7", "train_batch_size": "2"}
    status, body, _ = fetch(url + "/api/config", {"values": values, "path": "cfg/run.toml"})
    r = json.loads(body)
    assert status == 200 and r["saved"] == str(root / "cfg" / "run.toml") and "--max_train_steps 7" in r["command"]
    assert tomllib.loads((root / "cfg" / "run.toml").read_text())["max_train_steps"] == 7
    status, body, _ = fetch(url + "/api/config", {"values": values, "path": str(outside / "run.toml")})
    assert status == 400 and "outside the allowed folders" in json.loads(body)["error"]
    status, body, _ = fetch(url + "/api/start", {"values": dict(values, train_data_dir="")})
    r = json.loads(body)
    assert status == 200 and "id" not in r and "--train_data_dir" in r["errors"]["train_data_dir"]
    assert not os.path.exists(root / "runs")  # nothing started, nothing written


def test_malformed_bodies_are_one_line_400s(server):
    url = server()
    deep = b"[" * 100_000 + b"]" * 100_000
    for path, body in [("/api/validate", {"values": []}), ("/api/generate", {"loras": "x.safetensors"}),
                       ("/api/merge", {"loras": [["a"]]}), ("/api/run/stop", {"id": 3}),
                       ("/api/inspect", {"path": {"a": 1}}), ("/api/validate", {"values": {"seed": [1]}}),
                       ("/api/run/queue", {"id": "x", "action": None}), ("/api/convert", {"output": True})]:
        status, raw, _ = fetch(url + path, body)
        assert status == 400 and list(json.loads(raw)) == ["error"], (path, raw)
    for raw_body in (deep, b"[1, 2]", b"{", b"\xff"):
        req = urllib.request.Request(url + "/api/validate", data=raw_body, headers={
            "Content-Type": "application/json", "X-UI-Token": TOKEN})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=30)
        assert e.value.code == 400 and "error" in json.loads(e.value.read())


def test_config_file_paths_are_confined(tree, tiny_sd1):
    """A --config_file's values join the form's and go through the same guard; the run never reads the file."""
    root, allowed, outside = tree
    from mindone_lora_plugin.demo.training import make_shapes_dataset

    make_shapes_dataset(str(root / "data"), size=16, repeats=1)
    g = PathGuard(str(root), [os.path.dirname(tiny_sd1)])
    (outside / "prompts.txt").write_text("a secret prompt\n")
    (root / "bad.toml").write_text(f'sample_prompts = "{outside / "prompts.txt"}"\n'
                                   f'train_data_dir = "{outside}"\n')
    values = dict(pretrained_model_name_or_path=tiny_sd1, output_dir="runs/c", config_file="bad.toml",
                  train_batch_size="2")
    errors, argv = form.validate(values, g)
    assert argv is None and "outside the allowed folders" in errors["sample_prompts"]
    assert "outside the allowed folders" in errors["train_data_dir"]
    (root / "good.toml").write_text('train_data_dir = "data"\nlora_rank = 6\n')
    errors, argv = form.validate(dict(values, config_file="good.toml"), g)
    assert errors == {} and "--config_file" not in argv and argv[argv.index("--lora_rank") + 1] == "6"
    assert argv[argv.index("--train_data_dir") + 1] == str(root / "data")
    assert form.load_config(g, "good.toml") == {"train_data_dir": "data", "lora_rank": "6"}
    # Check catches what fails right after Start: a batch larger than the images, a folder holding a run
    errors, _ = form.validate(dict(values, config_file="good.toml", train_batch_size="500"), g)
    assert "larger than the 12 image(s)" in errors["train_batch_size"]
    (root / "runs" / "c").mkdir(parents=True)
    (root / "runs" / "c" / "train_log.jsonl").write_text("")
    errors, _ = form.validate(dict(values, config_file="good.toml"), g)
    assert "holds another run" in errors["output_dir"]


def test_stop_refuses_a_pid_it_did_not_start_and_runs_ignore_the_users_modules(tree):
    import subprocess
    import sys

    from mindone_lora_plugin.ui.runs import RUN_FILE, RunManager, pid_alive

    root = tree[0]
    runs = RunManager(PathGuard(str(root)))
    run = root / "crafted"
    run.mkdir()
    # a live process whose command line looks like a trainer's, named in a crafted ui_run.json
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "mindone_lora_plugin"])
    try:
        (run / RUN_FILE).write_text(json.dumps({"argv": ["x"], "launches": [{"pid": victim.pid, "time": 0}]}))
        with pytest.raises(LoraError, match="not started by the UI for this run"):
            runs.stop("crafted")
        (run / RUN_FILE).write_text(json.dumps({"argv": ["x"], "launches": [{"pid": os.getpid(), "time": 0}]}))
        with pytest.raises(LoraError):
            runs.stop("crafted")
        assert victim.poll() is None
    finally:
        victim.kill()
        victim.wait()
    # a module named like the package in the run folder (the process's working directory) is never imported
    shadow = root / "shadowed"
    shadow.mkdir()
    (shadow / "mindone_lora_plugin.py").write_text("open('SHADOWED', 'w').write('ran')\n")
    runs.start(["--help"], str(shadow))
    pid = json.loads((shadow / RUN_FILE).read_text())["launches"][-1]["pid"]
    deadline = time.monotonic() + 120
    while pid_alive(pid) and time.monotonic() < deadline:  # a finished child is a zombie until reaped: not alive
        time.sleep(0.1)
    assert not (shadow / "SHADOWED").exists() and "usage: mindone-lora train" in (shadow / "train.log").read_text()



def test_api_deletes_only_finished_runs_the_ui_started(server, tree):
    root = tree[0]
    url = server()
    for name, info in (("done", {"argv": ["x"], "launches": []}), ("waiting", {"argv": ["x"], "queued": 1.0})):
        (root / name).mkdir()
        (root / name / "ui_run.json").write_text(json.dumps(info))
        (root / name / "train_log.jsonl").write_text('{"event": "start", "step": 0, "time": 1}\n'
                                                     '{"event": "finished", "step": 3}\n')
    (root / "outside-ui").mkdir()
    (root / "outside-ui" / "train_log.jsonl").write_text('{"event": "finished", "step": 3}\n')
    runs = json.loads(fetch(url + "/api/runs")[1])["runs"]
    assert [r["id"] for r in runs][0] == "waiting" and {r["id"]: r["status"] for r in runs}["done"] == "finished"
    for run_id, message in (("waiting", "is queued"), ("outside-ui", "not started from the UI"),
                            ("..", "outside the allowed folders")):
        status, body, _ = fetch(url + "/api/run/delete", {"id": run_id})
        assert status == 400 and message in json.loads(body)["error"], body
    assert fetch(url + "/api/run/delete", {"id": "done"})[0] == 200
    assert not (root / "done").exists() and (root / "waiting").is_dir() and (root / "outside-ui").is_dir()


def test_check_reports_every_mistake_at_once(tree, tiny_sd1):
    """A field's mistake does not hide a whole-run one: both come back from one Check."""
    root = tree[0]
    from mindone_lora_plugin.demo.training import make_shapes_dataset

    make_shapes_dataset(str(root / "data"), size=16, repeats=1)
    g = PathGuard(str(root), [os.path.dirname(tiny_sd1)])
    values = dict(pretrained_model_name_or_path=tiny_sd1, train_data_dir="data", output_dir="runs/e",
                  train_batch_size="2", lora_rank="four", with_prior_preservation=True, resolution="33")
    errors, argv = form.validate(values, g)
    assert argv is None and {"lora_rank", "with_prior_preservation", "resolution"} <= set(errors), errors


def test_api_reorders_and_cancels_the_queue(server, tree):
    root = tree[0]
    url = server()
    for i, name in enumerate(("a", "b", "c")):  # three runs waiting, in this order
        (root / name).mkdir()
        (root / name / "ui_run.json").write_text(json.dumps({"argv": ["x"], "created": 10 + i, "queued": 10.0 + i}))

    def order():
        return [(r["id"], r["status"]) for r in json.loads(fetch(url + "/api/runs")[1])["runs"]]

    assert order() == [("a", "queued"), ("b", "queued"), ("c", "queued")]
    assert fetch(url + "/api/run/queue", {"id": "c", "action": "up"})[0] == 200
    assert fetch(url + "/api/run/queue", {"id": "a", "action": "down"})[0] == 200
    assert order() == [("c", "queued"), ("a", "queued"), ("b", "queued")]
    assert fetch(url + "/api/run/stop", {"id": "a"})[0] == 200  # Stop on a queued run cancels it
    assert order()[:2] == [("c", "queued"), ("b", "queued")] and ("a", "cancelled") in order()
    status, body, _ = fetch(url + "/api/run/queue", {"id": "b", "action": "sideways"})
    assert status == 400 and "cancel, up or down" in json.loads(body)["error"]


def test_a_half_sent_request_is_cut_off_at_the_deadline(tree):
    import socket
    import time

    from mindone_lora_plugin.ui.server import UIServer

    srv = UIServer(("127.0.0.1", 0), PathGuard(str(tree[0])), token=TOKEN, request_timeout_s=1).start()
    try:
        with socket.create_connection(srv.server_address[:2], timeout=10) as s:
            s.sendall(b"GET /api/info HTTP/1.1\r\nHost: 127.0.0.1\r\nX-UI-To")
            t0 = time.perf_counter()
            assert s.recv(100) == b"" and time.perf_counter() - t0 < 5  # closed by the server, not by our timeout
    finally:
        srv.shutdown()
