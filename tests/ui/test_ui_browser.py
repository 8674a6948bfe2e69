"""`mindone-lora ui` in a real browser (Debian's headless Chromium + chromedriver, driven by Selenium).

One run of the shipped demo model (the "tiny model on CPU" preset fills it) from start to end: fill the form, see the
dataset preview, bad inputs with their messages, start, watch progress, the loss curve and the validation image; a
page served from a second local origin tries the cross-site attacks while the run goes on (a text/plain form post
whose body is a whole request, no-cors fetches, a rebound host name) and nothing happens; restart the UI (the run is
found again, still running), stop (checkpoint written), resume to the end while a second run waits in the queue and
then runs, list the files and inspect the kohya file. A screenshot of every screen goes into the test's temporary
folder and is checked for being non-blank; with ``MINDONE_LORA_UI_SHOTS=DIR`` the ones the docs show are copied there.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow

INSTALL = ("browser tests need Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver, "
           "or make setup as root) and selenium (pip install selenium)")
CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
try:
    import selenium  # noqa: F401
except ImportError:
    selenium = None
if not (CHROMIUM and CHROMEDRIVER and selenium):
    pytest.skip(INSTALL, allow_module_level=True)

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select  # noqa: E402


def start_ui(root: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "mindone_lora_plugin.cli", "ui", "--port", "0", "--root", root],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    line = proc.stdout.readline()
    m = re.search(r"http://127\.0\.0\.1:(\d+)/\?token=[\w-]+", line)
    assert m, f"the UI did not start: {line}{proc.stdout.read() if proc.poll() is not None else ''}"
    assert "auth off (loopback only)" in line
    return proc, m.group(0)


def stop_ui(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    proc.stdout.close()


@pytest.fixture
def browser(tmp_path):
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager never downloads anything
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1400,1000", f"--user-data-dir={tmp_path / 'chromium'}",
                "--host-resolver-rules=MAP evil.example 127.0.0.1"):  # a rebound name: evil.example is us
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


DOC_SHOTS = {"3-form-filled": "ui-new-run.png", "6-finished": "ui.png", "8-inspect": "ui-lora-files.png"}


def shot(driver, folder, name: str) -> str:
    """Save a screenshot and check that it is not blank (many colours, not one flat tone)."""
    from PIL import Image, ImageStat

    path = os.path.join(folder, f"{name}.png")
    driver.execute_script("window.scrollTo(0, 0)")
    driver.save_screenshot(path)
    if os.environ.get("MINDONE_LORA_UI_SHOTS") and name in DOC_SHOTS:
        shutil.copyfile(path, os.path.join(os.environ["MINDONE_LORA_UI_SHOTS"], DOC_SHOTS[name]))
    im = Image.open(path).convert("RGB")
    assert im.size[0] > 600 and im.size[1] > 400
    colours = im.resize((350, 250)).getcolors(maxcolors=100000)
    assert colours is not None and len(colours) > 20, f"{name}: blank screenshot"
    assert max(ImageStat.Stat(im).stddev) > 10, f"{name}: blank screenshot"
    return path


def wait(driver, what, timeout=120, step=0.5):
    """Wait until ``what(driver)`` is truthy; fail with the page's run log when it never is."""
    end = time.time() + timeout
    while time.time() < end:
        try:
            got = what(driver)
        except Exception:  # an element re-rendered between two reads
            got = None
        if got:
            return got
        time.sleep(step)
    log = driver.find_element(By.ID, "run-log").text if driver.find_elements(By.ID, "run-log") else ""
    driver.save_screenshot(os.path.join(os.environ.get("TMPDIR", "/tmp"), "ui-test-timeout.png"))
    pytest.fail(f"timed out waiting ({timeout}s); run log:\n{log[-3000:]}")


def set_field(driver, dest: str, value: str) -> None:
    el = driver.find_element(By.ID, "f-" + dest)
    if not el.is_displayed():  # folded under "more options"
        details = el.find_element(By.XPATH, "./ancestor::details")
        driver.execute_script("arguments[0].open = true", details)
    el.clear()
    el.send_keys(value)


def error_of(driver, dest: str) -> str:
    return driver.find_element(By.ID, "err-" + dest).text


def text(driver, el_id: str) -> str:
    return driver.find_element(By.ID, el_id).text


ATTACK = """<!doctype html><title>attack</title><body>
<iframe name="sink"></iframe>
<form id="f" method="POST" enctype="text/plain" target="sink" action="UI/api/config"><input id="i"></form>
<script>
const ui = "UI", host = ui.replace("http://", "");
const json = '{"values": {}, "path": "evil.toml", "x": "="}';
// a whole request in the body of a refused text/plain post: it must never be parsed as the next request
const inner = "POST /api/config HTTP/1.1\\r\\nHost: " + host + "\\r\\nContent-Type: application/json\\r\\n" +
  "Content-Length: " + json.length + "\\r\\n\\r\\n" + json;
document.getElementById("i").name = inner.slice(0, -3); document.getElementById("i").value = '"}';
document.getElementById("f").submit();
const start = {values: {pretrained_model_name_or_path: "MODEL", train_data_dir: "shapes", output_dir: "runs/evil"}};
Promise.allSettled([
  fetch(ui + "/api/start", {method: "POST", mode: "no-cors", credentials: "include",
                            headers: {"Content-Type": "text/plain"}, body: JSON.stringify(start)}),
  fetch(ui + "/api/run/stop", {method: "POST", mode: "no-cors", credentials: "include", body: '{"id": "runs/tiny"}'}),
  fetch(ui + "/api/config", {method: "POST", credentials: "include", headers: {"Content-Type": "application/json"},
                             body: json}),
  fetch(ui + "/api/info", {credentials: "include"}).then((r) => r.text()),
]).then((rs) => { document.title = "done " + rs.map((r) => r.status + ":" + (r.value === undefined ? "" :
  typeof r.value === "string" ? r.value : "opaque")).join(" "); });
</script>"""


def serve_attack_page(ui_url: str, model: str):
    """The attacker: a page on another port of 127.0.0.1 (another origin, the same site), served by uvicorn."""
    import threading

    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import HTMLResponse
    from starlette.routing import Route

    page = ATTACK.replace("UI", ui_url.split("/?")[0].rstrip("/")).replace("MODEL", model)
    app = Starlette(routes=[Route("/", lambda request: HTMLResponse(page))])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return server, f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}/"


def test_train_watch_stop_resume_inspect(browser, tmp_path, tmp_path_factory):
    from mindone_lora_plugin.demo.shapes_eval import shipped_model
    from mindone_lora_plugin.demo.training import make_shapes_dataset

    # the runs folder the screenshots show: <basetemp>/lora-runs
    root, outside, shots = tmp_path_factory.mktemp("lora-runs", numbered=False), tmp_path / "outside", str(tmp_path)
    make_shapes_dataset(str(root / "shapes"), size=32, repeats=1)
    make_shapes_dataset(str(outside), size=16, repeats=1)
    ui, url = start_ui(str(root))
    try:
        d = browser
        d.get(url)
        wait(d, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1", 30)
        shot(d, shots, "1-new-run")
        # only what applies shows: DreamBooth's fields once DreamBooth is the way the images come, lokr's with lokr
        displayed = lambda dest: d.find_element(By.ID, "f-" + dest).is_displayed()  # noqa: E731
        assert displayed("train_data_dir") and not displayed("instance_data_dir") and not displayed("instance_prompt")
        Select(d.find_element(By.ID, "f-_source")).select_by_value("instance_data_dir")
        assert displayed("instance_data_dir") and displayed("instance_prompt") and not displayed("train_data_dir")
        assert not displayed("class_data_dir")  # it needs --with_prior_preservation
        d.find_element(By.ID, "f-with_prior_preservation").click()
        assert displayed("class_data_dir")
        Select(d.find_element(By.ID, "f-_source")).select_by_value("train_data_dir")
        assert not displayed("lokr_factor")
        Select(d.find_element(By.ID, "f-lora_algo")).select_by_value("lokr")
        assert displayed("lokr_factor")
        Select(d.find_element(By.ID, "f-lora_algo")).select_by_value("lora")
        # a preset replaces what another preset filled in, not what the user typed
        value = lambda dest: d.find_element(By.ID, "f-" + dest).get_attribute("value")  # noqa: E731
        set_field(d, "output_dir", "runs/typed")
        for preset in ("tiny model on CPU (a quick check)", "SDXL"):
            Select(d.find_element(By.ID, "preset")).select_by_visible_text(preset)
            d.find_element(By.ID, "btn-preset").click()
        assert value("pretrained_model_name_or_path") == "" and value("mode") == "auto"
        assert value("resolution") == "1024" and value("output_dir") == "runs/typed"
        # the two bad inputs, each with its message beside its field
        Select(d.find_element(By.ID, "preset")).select_by_visible_text("tiny model on CPU (a quick check)")
        d.find_element(By.ID, "btn-preset").click()
        set_field(d, "pretrained_model_name_or_path", str(root / "no-such-model"))
        set_field(d, "train_data_dir", str(outside))
        set_field(d, "output_dir", "runs/tiny")
        d.find_element(By.ID, "btn-validate").click()
        wait(d, lambda d: "does not exist" in error_of(d, "pretrained_model_name_or_path"), 20)
        assert "outside the allowed folders" in error_of(d, "train_data_dir")
        assert "fix the marked fields" in text(d, "cmdline")
        shot(d, shots, "2-bad-inputs")
        # the good form: the shipped model, preview, command line, start
        set_field(d, "pretrained_model_name_or_path", shipped_model())
        # the dataset through the picker: it lists the allowed folders only
        d.find_element(By.ID, "f-train_data_dir").clear()
        d.find_element(By.XPATH, "//input[@id='f-train_data_dir']/following-sibling::button").click()
        wait(d, lambda d: d.find_element(By.ID, "picker").is_displayed(), 10)
        assert str(outside) not in text(d, "picker-list")
        d.find_element(By.XPATH, f"//ul[@id='picker-list']/li[text()='{root}']").click()
        wait(d, lambda d: text(d, "picker-folder") == str(root), 10)
        d.find_element(By.XPATH, "//ul[@id='picker-list']/li[text()='shapes']").click()
        wait(d, lambda d: text(d, "picker-folder") == str(root / "shapes"), 10)
        d.find_element(By.ID, "picker-here").click()
        assert d.find_element(By.ID, "f-train_data_dir").get_attribute("value") == str(root / "shapes")
        set_field(d, "max_train_steps", "24")  # a run long enough to be stopped half-way
        set_field(d, "checkpointing_steps", "2")
        set_field(d, "validation_steps", "6")
        set_field(d, "output_name", "tiny_kohya")
        d.find_element(By.ID, "btn-validate").click()
        wait(d, lambda d: "--max_train_steps 24" in text(d, "cmdline"), 20)  # this Check's answer
        assert text(d, "cmdline").startswith("mindone-lora train --pretrained_model_name_or_path")
        assert error_of(d, "train_data_dir") == "" and "--with_prior_preservation" not in text(d, "cmdline")
        # the model is SD1.x: FLUX's flags are hidden, lokr's only while lokr is chosen
        assert not displayed("timestep_sampling") and not displayed("lokr_factor")
        assert not d.execute_script("return document.getElementById('f-snr_gamma').closest('.field').hidden")
        assert "SD1.x model" in text(d, "model-arch")
        wait(d, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#dataset-preview img")) >= 3, 20)
        assert "12 image(s)" in text(d, "dataset-preview") and "a blue circle" in text(d, "dataset-preview")
        shot(d, shots, "3-form-filled")
        d.find_element(By.ID, "btn-start").click()
        # watch: progress, the loss curve growing, a validation image
        wait(d, lambda d: text(d, "run-status") in ("starting", "running"), 20)
        points = wait(d, lambda d: int(d.find_element(By.ID, "loss-canvas").get_attribute("data-points")) >= 1, 150)
        wait(d, lambda d: int(d.find_element(By.ID, "loss-canvas").get_attribute("data-points")) > points, 90)
        assert re.search(r"step \d+ of 24", text(d, "run-numbers"))
        wait(d, lambda d: d.find_elements(By.CSS_SELECTOR, "#run-images img.val"), 90)
        wait(d, lambda d: d.execute_script("return document.querySelector('#run-images img.val').naturalWidth") > 0, 20)
        shot(d, shots, "4-running")
        # a page of another origin tries to act on the UI: nothing happens
        attacker, attack_url = serve_attack_page(url, shipped_model())
        try:
            d.get(attack_url)
            outcome = wait(d, lambda d: d.title.startswith("done") and d.title, 30)
        finally:
            attacker.should_exit = True
        assert '"root"' not in outcome  # the read was blocked (no CORS)
        d.get(url.replace("127.0.0.1", "evil.example").split("/?")[0] + "/api/file?path=shapes/metadata.jsonl")
        assert "refused" in d.find_element(By.TAG_NAME, "body").text  # a rebound name gets nothing
        assert not (root / "evil.toml").exists() and not (root / "runs" / "evil").exists()
        # restart the UI: the run goes on (the attack did not stop it) and is found again
        stop_ui(ui)
        ui, url = start_ui(str(root))
        d.get(url + "#runs")
        wait(d, lambda d: text(d, "run-status") == "running", 30)
        step_before = int(re.search(r"step (\d+)", text(d, "run-numbers")).group(1))
        assert step_before < 24
        # stop: a checkpoint first, then "stopped"
        d.find_element(By.ID, "btn-stop").click()
        wait(d, lambda d: text(d, "run-status") == "stopped", 90)
        stopped_at = int(re.search(r"step (\d+)", text(d, "run-numbers")).group(1))
        assert stopped_at < 24 and "checkpoints: " in text(d, "run-numbers")
        assert os.path.isdir(root / "runs" / "tiny" / f"checkpoint-{stopped_at}")
        shot(d, shots, "5-stopped")
        # resume to the end
        wait(d, lambda d: d.find_element(By.ID, "btn-resume").is_enabled(), 10)
        d.find_element(By.ID, "btn-resume").click()
        wait(d, lambda d: text(d, "run-status") in ("starting", "running"), 20)
        # a second run with the first one's settings (Clone) waits in the queue while the first goes on, then runs
        d.find_element(By.ID, "btn-clone").click()
        wait(d, lambda d: d.find_element(By.ID, "f-max_train_steps").get_attribute("value") == "24", 10)
        set_field(d, "output_dir", "runs/second")
        set_field(d, "max_train_steps", "2")
        set_field(d, "validation_steps", "100")
        d.find_element(By.ID, "btn-queue").click()
        wait(d, lambda d: "runs/second queued" in text(d, "runs-list"), 20)
        d.find_element(By.XPATH, "//table[@id='runs-list']//td[text()='runs/tiny']").click()
        wait(d, lambda d: text(d, "run-title") == "runs/tiny" and text(d, "run-status") == "finished", 150)
        assert "step 24 of 24" in text(d, "run-numbers") and not d.find_element(By.ID, "btn-resume").is_enabled()
        assert "resumed from" in text(d, "run-log")
        d.execute_script("document.getElementById('gallery').open = true")
        wait(d, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gallery-images img")) >= 4, 10)
        shot(d, shots, "6-finished")
        d.find_element(By.XPATH, "//table[@id='runs-list']//td[text()='runs/second']").click()
        wait(d, lambda d: text(d, "run-title") == "runs/second" and text(d, "run-status") == "finished", 150)
        # the output files, and the kohya file inspected
        d.find_element(By.ID, "btn-files").click()
        wait(d, lambda d: "tiny_kohya.safetensors" in text(d, "files-list"), 20)
        shot(d, shots, "7-files")
        ckpt = d.find_element(By.XPATH, "//div[@id='files-list']//li[a[contains(text(), 'optimizer')]]")
        assert not ckpt.find_elements(By.TAG_NAME, "button")  # inspect only for LoRA files
        row = d.find_element(By.XPATH, "//div[@id='files-list']//li[a[text()='tiny_kohya.safetensors']]")
        row.find_element(By.TAG_NAME, "button").click()
        wait(d, lambda d: "kohya" in text(d, "inspect-result"), 30)
        assert "unet" in text(d, "inspect-components") and "sd1" in text(d, "inspect-result").lower()
        shot(d, shots, "8-inspect")
        # Convert asks before replacing a file
        kohya = d.find_element(By.ID, "inspect-path").get_attribute("value")
        for el_id, value in (("conv-in", kohya), ("conv-out", "converted.safetensors")):
            d.find_element(By.ID, el_id).clear()
            d.find_element(By.ID, el_id).send_keys(value)
        Select(d.find_element(By.ID, "conv-to")).select_by_visible_text("diffusers")
        d.find_element(By.ID, "btn-convert").click()
        wait(d, lambda d: "wrote" in text(d, "convert-message"), 30)
        d.find_element(By.ID, "btn-convert").click()
        alert = wait(d, lambda d: d.switch_to.alert, 10)
        assert "exists; replace it?" in alert.text
        alert.dismiss()
        wait(d, lambda d: "not replaced" in text(d, "convert-error"), 10)
        # generate with the run's LoRA: each denoising step is reported while it works, then the grid
        for el_id, value in (("gen-model", shipped_model()), ("gen-prompt", "a red circle"), ("gen-steps", "3"),
                             ("gen-n", "1"), ("gen-out", "generated")):
            d.find_element(By.ID, el_id).clear()
            d.find_element(By.ID, el_id).send_keys(value)
        d.find_element(By.CSS_SELECTOR, "#gen-loras .lora-row input").send_keys(kohya)
        d.find_element(By.ID, "btn-generate").click()
        wait(d, lambda d: d.find_element(By.ID, "gen-progress").is_displayed(), 10, 0.1)
        lines = set()
        wait(d, lambda d: lines.add(text(d, "gen-progress-text")) or "done: " in text(d, "gen-progress-text"), 120, 0.1)
        assert text(d, "gen-progress-text") == "done: image 1 of 1: denoising step 3 of 3", lines
        wait(d, lambda d: d.execute_script("return document.getElementById('gen-grid-img').naturalWidth") > 0, 20)
        assert not d.find_element(By.ID, "gen-progress").is_displayed() and "wrote 1 image" in text(
            d, "generate-message")
    finally:
        stop_ui(ui)
        _stop_training(root)


def _stop_training(root) -> None:
    """Never leave a training process behind when the test fails half-way."""
    import json

    from mindone_lora_plugin.ui.runs import pid_alive

    for top, _, names in os.walk(root):
        if "ui_run.json" in names:
            with open(os.path.join(top, "ui_run.json")) as f:
                for launch in json.load(f).get("launches", []):
                    if pid_alive(launch["pid"]):
                        os.kill(launch["pid"], signal.SIGKILL)
