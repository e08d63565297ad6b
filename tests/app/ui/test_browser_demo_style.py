"""The demo's style picker in a real browser (Chromium + Playwright against `lorastudio ui --demo --demo-style`, its
own server): the picker and banner show the style asked for on the command line; picking another style and
pressing the demo button draws that style, the banner names it, the Dataset folder and the Train form's image
folder point at its pictures, and a reloaded page keeps the picked style."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from app.demo import DEMO_STYLE_HELP, DEMO_STYLES, style_help
from tests.app.ui.test_browser import CHROMIUM, LAUNCH_ARGS, field, free_port, tab, wait_http
from tests.fixtures.waits import HANG_MS, HANG_S

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium at /usr/bin/chromium"),
              pytest.mark.skipif(len(DEMO_STYLES) < 3, reason="needs three demo styles")]
sync_api = pytest.importorskip("playwright.sync_api")
expect = sync_api.expect
REPO = Path(__file__).resolve().parents[3]
ASKED, PICKED = DEMO_STYLES[1], DEMO_STYLES[2]  # neither is the default


@pytest.fixture(scope="module")
def style_page(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo_style_root")
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONPATH": str(REPO),
           "LORASTUDIO_HOME": str(tmp_path_factory.mktemp("demo_style_home")), "TOKENIZERS_PARALLELISM": "false"}
    log = open(root / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "ui", "--root", str(root), "--port", str(port),
                             "--demo", "--demo-style", ASKED], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        wait_http(f"http://127.0.0.1:{port}/", HANG_S, proc)
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
            page = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
            page.set_default_timeout(HANG_MS)
            page.goto(f"http://127.0.0.1:{port}/")
            yield page, root
            browser.close()
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(5)  # the server is done with; a gradio server that lingers after SIGINT is killed
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_pick_a_demo_style_and_the_forms_point_at_its_pictures(style_page):
    page, root = style_page
    banner = page.locator("#demo-banner")
    # --demo-style: the banner and the picker say the style asked for
    expect(banner).to_contain_text(f"Style: {ASKED} ({DEMO_STYLE_HELP[ASKED]})", timeout=HANG_MS)
    expect(page.locator("#demo-style input")).to_have_value(style_help(ASKED))
    expect(page.locator("#ds-folder input")).to_have_value(re.compile(rf"demo/{ASKED}/images$"))

    page.locator("#demo-style input").click()
    for s in DEMO_STYLES:  # every offered style, with what it looks like
        expect(page.get_by_role("option", name=style_help(s), exact=True)).to_be_visible()
    page.get_by_role("option", name=style_help(PICKED), exact=True).click()
    page.locator("#demo-btn").click()
    expect(banner).to_contain_text(f"Style: {PICKED} ({DEMO_STYLE_HELP[PICKED]})", timeout=HANG_MS)
    expect(page.locator("#ds-folder input")).to_have_value(re.compile(rf"demo/{PICKED}/images$"))
    tab(page, "Train")
    expect(page.locator(f"#{field(page, 'data.dir')} textarea, #{field(page, 'data.dir')} input").first
           ).to_have_value(re.compile(rf"demo/{PICKED}/images$"))
    assert len(list((root / "demo" / PICKED / "images").glob("*.png"))) == 30

    page.reload()  # a reloaded page offers the style made last
    expect(page.locator("#demo-banner")).to_contain_text(f"Style: {PICKED}", timeout=HANG_MS)
    expect(page.locator("#demo-style input")).to_have_value(style_help(PICKED))
