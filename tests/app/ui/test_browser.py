"""The web app in a real browser: Debian's Chromium driven by Playwright against `lorastudio ui --demo` on 127.0.0.1.

One server and one page for the module, on the demo (tiny model, drawn 64 px pictures). The tests run in order
and build on each other, like a newcomer's first session: scan, caption, bucket preview; train a few steps with
live progress, reload the page (re-attach), stop, resume to the end; generate with two LoRAs at different
weights and a weight x seed grid; export a preset and import it back. Every step asserts what the page shows,
including what a new user hit: labels in kohya/A1111 words with the key beside them, a scan report that follows
the captions, the LoRA list filled when a job ends, messages beside the control they are about, no leaked i18n
keys.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from app.demo import DEMO_STYLES
from tests.fixtures.waits import HANG_MS, HANG_S

CHROMIUM = "/usr/bin/chromium"
REPO = Path(__file__).resolve().parents[3]

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium at /usr/bin/chromium")]
sync_api = pytest.importorskip("playwright.sync_api")
# every expect() in the browser tests (they all import this module) waits on the hang guard, not 5 s
sync_api.expect.set_options(timeout=HANG_MS)
expect = sync_api.expect

LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
               "--disable-sync", "--no-first-run"]
# the demo runs on the committed toy-world base (pretrained here), not on random weights
DEMO_LABEL = "toy-world model, pretrained here"
DEMO_MODEL = re.compile(r"trainer/assets/toyworld$")
DEMO_PICTURES = re.compile(rf"demo/{DEMO_STYLES[0]}/images$")  # the default demo style's own folder
SHOTS = os.environ.get("LORASTUDIO_SCREENSHOTS")  # a folder: save the documentation screenshots there


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, proc: subprocess.Popen) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.25)
    raise TimeoutError(url)


@contextlib.contextmanager
def ui_server(root: Path, home: Path, *args: str):
    """`lorastudio ui --root ROOT [ARGS]` on a free loopback port with LORASTUDIO_HOME=HOME, its output in
    ROOT/server.log; yields the page's URL once it is served. Every browser test's server is this one."""
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONPATH": str(REPO),
           "LORASTUDIO_HOME": str(home), "TOKENIZERS_PARALLELISM": "false"}
    log = open(root / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "ui", "--root", str(root), "--port", str(port), *args],
                            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        url = f"http://127.0.0.1:{port}/"
        wait_http(url, HANG_S, proc)
        yield url
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(5)  # the server is done with; a gradio server that lingers after SIGINT is killed
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@contextlib.contextmanager
def browser_page(url: str, **context_options):
    """A Chromium page (1400x1000, the hang guard as its default timeout) on URL, closed at the end."""
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        try:
            pg = browser.new_context(viewport={"width": 1400, "height": 1000}, **context_options).new_page()
            pg.set_default_timeout(HANG_MS)
            pg.goto(url)
            yield pg
        finally:
            browser.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("ui_root")
    home = tmp_path_factory.mktemp("ui_home")
    with ui_server(root, home, "--demo") as url:
        yield {"url": url, "root": root, "home": home}


@pytest.fixture(scope="module")
def page(server):
    with browser_page(server["url"], accept_downloads=True) as pg:
        yield pg


def tab(page, name: str) -> None:
    page.get_by_role("tab", name=name, exact=True).click()


def fill(page, elem_id: str, value: str) -> None:
    box = page.locator(f"#{elem_id} textarea, #{elem_id} input").first
    box.fill(value)
    box.blur()


def field(page, key: str):
    section, name = key.split(".", 1)
    return f"f-{section}-{name}"


def shot(page, name: str, top: str, bottom: str) -> None:
    """Save the part of the page from the top of one element to the bottom of another (docs screenshots)."""
    if not SHOTS:
        return
    Path(SHOTS).mkdir(parents=True, exist_ok=True)
    page.locator(top).first.scroll_into_view_if_needed()
    page.wait_for_timeout(600)
    a = page.locator(top).first.bounding_box()
    b = page.locator(bottom).first.bounding_box()
    y0 = a["y"] + page.evaluate("window.scrollY") - 12
    y1 = b["y"] + b["height"] + page.evaluate("window.scrollY") + 12
    path = Path(SHOTS) / name
    page.screenshot(path=str(path), full_page=True,
                    clip={"x": 0, "y": max(0, y0), "width": page.viewport_size["width"], "height": y1 - y0})
    from PIL import Image  # 256 colours: a third of the size, no visible change for a UI
    Image.open(path).convert("RGB").quantize(colors=256, dither=Image.Dither.NONE).save(path, optimize=True)


# ---------------------------------------------------------------------------------------------------- tests


def test_page_has_four_tabs_and_demo_fills_the_forms(page):
    for name in ("Dataset", "Train", "Generate", "Presets"):
        expect(page.get_by_role("tab", name=name, exact=True)).to_be_visible()
    # --demo builds the tiny model in the background; the banner says what it is and the forms fill in
    expect(page.locator("#demo-banner")).to_contain_text(DEMO_LABEL, timeout=HANG_MS)
    expect(page.locator("#ds-folder input")).to_have_value(DEMO_PICTURES, timeout=HANG_MS)
    tab(page, "Train")
    expect(page.locator(f"#{field(page, 'model.base')} input")).to_have_value(DEMO_MODEL)
    expect(page.locator(f"#{field(page, 'data.resolution')} input")).to_have_value("64")
    # the words users know first, the key (what --set takes) beside them
    expect(page.locator(f"#{field(page, 'lora.rank')}")).to_contain_text("Network dim (rank) · lora.rank")
    expect(page.locator(f"#{field(page, 'data.dir')}")).to_contain_text("Image folder · data.dir")
    expect(page.locator(f"#{field(page, 'train.max_steps')}")).to_contain_text("Max train steps · train.max_steps")
    tab(page, "Dataset")


def test_creating_the_demo_again_says_it_exists_and_fills_the_forms(page):
    fill(page, "ds-folder", "somewhere-else")
    page.locator("#demo-btn").click()
    expect(page.locator("#demo-banner")).to_contain_text("The demo already exists", timeout=HANG_MS)
    expect(page.locator("#demo-banner")).to_contain_text(DEMO_LABEL)
    expect(page.locator("#ds-folder input")).to_have_value(DEMO_PICTURES)


def test_scan_caption_edit_and_bucket_preview(page, server):
    page.locator("#ds-scan").click()
    expect(page.locator("#ds-status")).to_contain_text("30 picture(s), 30 usable", timeout=HANG_MS)
    expect(page.locator("#ds-problems")).to_contain_text("missing_caption")  # no captions yet, by file
    expect(page.locator("#ce-grid")).to_contain_text("(no caption)")  # the caption editor's pictures
    expect(page.locator("#ds-summary")).to_contain_text("no caption file: 30")
    # the whole report, which the summary points to, is a download
    with page.expect_download() as dl:
        page.locator("#ds-report").click()
    assert '"missing_caption"' in Path(dl.value.path()).read_text(encoding="utf-8")

    # template captioner with a live progress bar, trigger first
    fill(page, "cap-trigger", "zxq")
    page.locator("#cap-run").click()
    expect(page.locator("#cap-status")).to_contain_text("captioned 30 image(s)", timeout=HANG_MS)
    expect(page.locator("#ce-cap-0 textarea")).to_have_value("zxq, blue circle")  # the editor shows the new files
    # the scan report follows the captions: it is re-run, not left saying "no caption file: 30"
    expect(page.locator("#ds-summary")).not_to_contain_text("no caption file")
    expect(page.locator("#ds-problems")).not_to_contain_text("missing_caption")
    images = Path(page.locator("#ds-folder input").input_value())
    assert (images / "red_square_00.txt").read_text(encoding="utf-8").strip() == "zxq, red square"

    # edit one caption in place (the caption editor: tests/app/ui/test_browser_caption_editor.py)
    expect(page.locator("#ce-pick-0")).to_contain_text("blue_circle_02.png")  # pictures are sorted by name
    expect(page.locator("#ce-cap-0 textarea")).to_have_value("zxq, blue circle")
    fill(page, "ce-cap-0", "zxq, blue circle, striped")
    page.locator("#ce-save").click()
    expect(page.locator("#ce-status")).to_contain_text("saved the caption of blue_circle_02.png")
    expect(page.locator("#ce-cap-0 textarea")).to_have_value("zxq, blue circle, striped")
    assert (images / "blue_circle_02.txt").read_text(encoding="utf-8").strip() == "zxq, blue circle, striped"

    # caption operations: find/replace, tag stats, undo
    fill(page, "op-find", "striped")
    fill(page, "op-repl", "stripes")
    page.locator("#op-replace-btn").click()
    expect(page.locator("#op-status")).to_contain_text("1 caption(s) changed")
    expect(page.locator("#op-status")).to_contain_text("Undo last edit")  # the button, not a shell command
    expect(page.locator("#op-status")).not_to_contain_text("lorastudio captions")
    expect(page.locator("#op-tags")).to_contain_text("stripes")
    page.locator("#op-undo-btn").click()
    expect(page.locator("#op-status")).to_contain_text("undo replace 'striped' => 'stripes': 1 caption(s) changed")
    assert "striped" in (images / "blue_circle_02.txt").read_text(encoding="utf-8")
    page.locator("#op-stats-btn").click()
    expect(page.locator("#op-tags")).to_contain_text("zxq")

    # bucket preview: counts and the contact sheet with crop boxes
    page.locator("#bp-run").click()
    expect(page.locator("#bp-status")).to_contain_text("30 picture(s) in 1 bucket(s)", timeout=HANG_MS)
    expect(page.locator("#bp-counts")).to_contain_text("64x64")
    expect(page.locator("#bp-rows")).to_contain_text("blue_square_01.png")  # a wide picture: its crop box shows
    expect(page.locator("#bp-sheet img")).to_be_visible()
    # no leaked gradio i18n key: gradio announces each finished event in a status line up to 5 s later
    said = set()
    for _ in range(70):
        said.add(page.evaluate("Array.from(document.querySelectorAll('[role=status]'))"
                               ".map(e => e.textContent.trim()).join('|')"))
        page.wait_for_timeout(100)
    assert not any("common." in text for text in said), said
    assert "common." not in page.locator("body").inner_text()
    shot(page, "dataset.png", "#demo-banner", "#ds-problems")


def test_bad_fields_are_shown_beside_them_before_anything_starts(page, server):
    tab(page, "Train")
    fill(page, field(page, "train.max_steps"), "abc")
    expect(page.locator("#err-train-max_steps")).to_contain_text("expected int")
    fill(page, field(page, "train.learning_rate"), "-1")
    page.locator("#tr-start").click()
    expect(page.locator("#tr-msg")).to_contain_text("need attention before training can start")
    expect(page.locator("#err-train-learning_rate")).to_contain_text("below the minimum")
    assert not (server["root"] / "outputs" / "demo-lora").exists()  # nothing was started or written


def test_trainer_failure_is_shown_and_the_app_keeps_working(page, server):
    """A run the trainer refuses (not a model folder): exit code and log lines on the page; then a real run works."""
    base_box = page.locator(f"#{field(page, 'model.base')} input")
    model = base_box.input_value()
    broken = server["root"] / "not-a-model"
    broken.mkdir()
    fill(page, field(page, "model.base"), str(broken))
    fill(page, field(page, "train.max_steps"), "10")
    fill(page, field(page, "train.learning_rate"), "0.001")
    fill(page, field(page, "output.name"), "broken-run")
    page.locator("#tr-start").click()
    expect(page.locator("#train-progress-bar")).to_have_attribute("data-state", "failed", timeout=HANG_MS)
    expect(page.locator("#tr-status")).to_contain_text("Exit code 2")
    expect(page.locator("#tr-status")).to_contain_text("not-a-model")
    expect(page.locator("#tr-log")).to_contain_text("error: ")
    expect(page.locator("#tr-start")).to_be_enabled()
    fill(page, field(page, "model.base"), model)
    fill(page, field(page, "output.name"), "demo-lora")


def trainer_pids(root: Path) -> list[int]:
    """The trainer processes the app started for this test's root (``python -m trainer --config <root>/...``)."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            argv = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        args = [a.decode(errors="replace") for a in argv]
        if "trainer" in args and "--config" in args and any(str(root) in a for a in args):
            pids.append(int(d.name))
    return pids


def test_train_live_progress_reattach_stop_resume(page, server):
    fill(page, field(page, "train.max_steps"), "10")
    fill(page, field(page, "train.learning_rate"), "0.001")
    page.locator("#tr-advanced").click()
    fill(page, field(page, "sample.every_steps"), "4")
    expect(page.locator("#tr-samples-note")).to_contain_text("First sample at step 4 (every 4 steps)")
    fill(page, field(page, "sample.steps"), "2")
    fill(page, field(page, "sample.prompts"), "zxq, a red circle")
    fill(page, field(page, "train.save_every_steps"), "0")
    page.locator("#tr-start").click()
    expect(page.locator("#tr-msg")).to_contain_text("started run 'demo-lora'")
    expect(page.locator("#err-train-max_steps")).to_be_hidden()
    expect(page.locator("#tr-command")).to_contain_text("python -m trainer --config")
    progress = page.locator("#train-progress-bar")
    expect(progress).to_have_attribute("data-state", "running", timeout=HANG_MS)
    expect(progress).to_contain_text(re.compile(r"step [1-9]\d* / 10"), timeout=HANG_MS)
    expect(progress).to_contain_text("ETA")
    # Hold the trainer still (SIGSTOP) while the page is checked, so a fast machine cannot finish the 10 steps before
    # Stop is pressed; Stop's SIGINT waits for SIGCONT and is handled at the next step.
    frozen = trainer_pids(server["root"])
    assert frozen, "the trainer finished before it could be held"
    for pid in frozen:
        os.kill(pid, signal.SIGSTOP)

    # the rest of the app answers while the trainer runs (it is a separate process)
    tab(page, "Dataset")
    t0 = time.perf_counter()
    page.locator("#op-stats-btn").click()
    expect(page.locator("#op-status")).to_contain_text("tag frequency of", timeout=HANG_MS)
    assert time.perf_counter() - t0 < 15
    tab(page, "Train")
    expect(page.locator("#train-progress-bar")).to_have_attribute("data-state", re.compile("running|stopping"))

    # a reloaded page re-attaches to the running job (server-side state)
    page.reload()
    tab(page, "Train")
    expect(page.locator("#train-progress-bar")).to_contain_text(re.compile(r"step \d+ / 10"), timeout=HANG_MS)
    expect(page.locator(f"#{field(page, 'train.max_steps')} input")).to_have_value("10")
    expect(page.locator("#tr-start")).to_be_disabled()

    # one job at a time
    page.locator("#tr-stop").click()
    expect(page.locator("#train-progress-bar")).to_have_attribute("data-state", "stopping")
    for pid in frozen:
        os.kill(pid, signal.SIGCONT)
    expect(page.locator("#train-progress-bar")).to_have_attribute("data-state", "stopped", timeout=HANG_MS)
    expect(page.locator("#tr-status")).to_contain_text("a checkpoint was saved")
    stopped_at = int(page.locator("#train-progress-bar").get_attribute("data-step"))
    assert 1 <= stopped_at < 10

    page.locator("#tr-resume").click()
    expect(page.locator("#tr-msg")).to_contain_text("resuming run 'demo-lora'")
    expect(page.locator("#tr-command")).to_contain_text("--resume")
    expect(page.locator("#train-progress-bar")).to_have_attribute("data-state", "completed", timeout=HANG_MS)
    expect(page.locator("#train-progress-bar")).to_contain_text("step 10 / 10")
    expect(page.locator("#tr-status")).to_contain_text("demo-lora.safetensors")
    expect(page.locator("#tr-log")).to_contain_text("resumed from")
    expect(page.locator("#tr-samples img").first).to_be_visible(timeout=HANG_MS)
    expect(page.locator("#tr-loss canvas, #tr-loss svg").first).to_be_visible()
    assert "common." not in page.locator("body").inner_text()
    # the job's end refreshed the LoRA pickers: the Presets tab's (built when the server started, before any
    # LoRA existed, and not refreshed by opening its tab) offers the new LoRA without pressing anything
    tab(page, "Presets")
    page.locator("#p-lora input").click()
    expect(page.get_by_role("option", name="outputs/demo-lora/demo-lora.safetensors")).to_be_visible(timeout=HANG_MS)
    page.keyboard.press("Escape")
    tab(page, "Train")
    run = server["root"] / "outputs" / "demo-lora"
    assert (run / "demo-lora.safetensors").is_file() and (run / "config.toml").is_file()
    assert "=== " in (run / "train.log").read_text()
    shot(page, "train.png", "#tr-start", "#tr-log")


def test_generate_with_two_loras_and_a_grid(page, server):
    tab(page, "Generate")
    expect(page.locator("#g-base input")).to_have_value(DEMO_MODEL)
    # Add with nothing picked: the message is beside the picker, not below the Generate row
    page.locator("#g-add").click()
    expect(page.locator("#g-add-status")).to_contain_text("pick a LoRA file first")
    pick, msg = page.locator("#g-pick").bounding_box(), page.locator("#g-add-status").bounding_box()
    assert msg["y"] < pick["y"] + pick["height"] and msg["y"] + msg["height"] > pick["y"], (pick, msg)
    assert msg["x"] > pick["x"] + pick["width"] - 1
    run = server["root"] / "outputs" / "demo-lora"
    step_file = sorted(run.glob("demo-lora-step*.safetensors"))[0]
    for path, weight in ((run / "demo-lora.safetensors", "0.8"), (step_file, "0.3")):
        fill(page, "g-pick", str(path))
        page.locator("#g-add").click()
        expect(page.locator("#g-add-status")).to_contain_text(f"added {path.name}")
    expect(page.locator("[id^=g-lora-name-]")).to_have_count(2)  # one row (weight slider) per LoRA
    for i, weight in enumerate(("0.8", "0.3")):
        box = page.locator(f"#g-lora-weight-{i} input[type=number]")
        box.fill(weight)
        box.press("Enter")
    page.wait_for_timeout(500)
    fill(page, "g-prompt", "zxq, a red circle")
    fill(page, "g-steps", "4")
    page.locator("#g-generate").click()
    expect(page.locator("#g-status")).to_contain_text("1 image(s)", timeout=HANG_MS)
    expect(page.locator("#g-status")).to_contain_text("demo-lora 0.8")
    expect(page.locator("#g-status")).to_contain_text(f"{step_file.stem} 0.3")
    params = page.locator("#g-params textarea")
    expect(params).to_have_value(re.compile(r"<lora:demo-lora:0\.8>"))
    expect(params).to_have_value(re.compile(re.escape(f"<lora:{step_file.stem}:0.3>")))
    expect(page.locator("#g-gallery img").first).to_be_visible()

    # new weights (and a text-encoder/UNet split under Advanced): the base model is reused, not reloaded
    box = page.locator("#g-lora-weight-1 input[type=number]")
    box.fill("-0.5")
    box.press("Enter")
    page.locator("#g-lora-0").get_by_text("Advanced: separate text-encoder / UNet weights").click()
    page.locator("#g-lora-split-0 input").check()
    box = page.locator("#g-lora-te-0 input[type=number]")
    box.fill("0.2")
    box.press("Enter")
    page.wait_for_timeout(500)
    page.locator("#g-generate").click()
    expect(page.locator("#g-status")).to_contain_text(f"{step_file.stem} -0.5", timeout=HANG_MS)
    expect(page.locator("#g-status")).to_contain_text("base model reused")
    expect(page.locator("#g-params textarea")).to_have_value(re.compile(r"<lora:demo-lora:0\.2:0\.8>"))
    expect(page.locator("#g-params textarea")).to_have_value(re.compile(r'Lora te weights: "demo-lora: 0\.2'))

    # weight x seed grid of the first LoRA
    fill(page, "g-grid-weights", "0, 1")
    fill(page, "g-grid-seeds", "1, 2")
    page.locator("#g-grid").click()
    expect(page.locator("#g-status")).to_contain_text("grid: 2 seeds x 2 weights", timeout=HANG_MS)
    expect(page.locator("#g-params textarea")).to_have_value(
        re.compile(r'Grid: "rows seed \[1; 2\], columns demo-lora weight \[0; 1\]"'))
    expect(page.locator("#g-gallery img").first).to_be_visible()
    expect(page.locator("#g-gallery")).to_contain_text("demo-lora: weight")  # the LoRA's name is the grid's title
    img = page.locator("#g-gallery img").first.bounding_box()
    box = page.locator("#g-gallery").bounding_box()
    assert img["y"] + img["height"] <= box["y"] + box["height"] + 1 and img["x"] + img["width"] <= \
        box["x"] + box["width"] + 1, (img, box)  # the picture stays inside its box
    shot(page, "generate.png", "#g-base", "#g-gallery")


def test_presets_export_import_and_rebuild(page, server, tmp_path):
    tab(page, "Presets")
    expect(page.locator("#p-table")).to_contain_text("sd15-style")
    expect(page.locator("#p-table")).to_contain_text("demo")
    page.locator("#p-pick input").fill("demo")
    page.keyboard.press("Enter")
    expect(page.locator("#p-text")).to_contain_text("preset_version = 1")
    with page.expect_download() as dl:
        page.locator("#p-export").click()
    exported = tmp_path / "exported.toml"
    dl.value.save_as(exported)
    assert "resolution = 64" in exported.read_text()

    # the current Train form as a user preset
    fill(page, "p-save-name", "from-form")
    page.locator("#p-save").click()
    expect(page.locator("#p-save-status")).to_contain_text("saved preset 'from-form'")
    assert "max_steps = 10" in (server["home"] / "presets" / "from-form.toml").read_text()

    # import it back under another name
    page.locator("#p-file input[type=file]").set_input_files(str(exported))
    fill(page, "p-import-name", "demo-copy")
    page.locator("#p-import").click()
    expect(page.locator("#p-import-status")).to_contain_text("imported 'demo-copy'")
    expect(page.locator("#p-table")).to_contain_text("demo-copy")
    assert (server["home"] / "presets" / "demo-copy.toml").is_file()

    # a preset pointing outside the allowed folders is refused with the reason
    bad = tmp_path / "bad.toml"
    bad.write_text('preset_version = 1\n[data]\ndir = "/etc"\n')
    page.locator("#p-file input[type=file]").set_input_files(str(bad))
    fill(page, "p-import-name", "")
    page.locator("#p-import").click()
    expect(page.locator("#p-import-status")).to_contain_text("data.dir points outside the allowed folders")
    assert not (server["home"] / "presets" / "bad.toml").exists()

    # rebuild the preset that made the trained LoRA from its metadata
    lora = server["root"] / "outputs" / "demo-lora" / "demo-lora.safetensors"
    fill(page, "p-lora", str(lora))
    page.locator("#p-rebuild").click()
    expect(page.locator("#p-text")).to_contain_text("Rebuilt from demo-lora.safetensors")
    expect(page.locator("#p-text")).to_contain_text("max_steps = 10")
