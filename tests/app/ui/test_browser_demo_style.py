"""The demo's style picker in a real browser (Chromium + Playwright against `lorastudio ui --demo --demo-style`, its
own server): the picker and banner show the style asked for on the command line; picking another style and
pressing the demo button draws that style, the banner names it, the Dataset folder and the Train form's image
folder point at its pictures, and a reloaded page keeps the picked style."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from app.demo import DEMO_STYLE_HELP, DEMO_STYLES, style_help
from tests.app.ui.test_browser import CHROMIUM, browser_page, field, tab, ui_server
from tests.fixtures.waits import HANG_MS

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
    home = tmp_path_factory.mktemp("demo_style_home")
    with ui_server(root, home, "--demo", "--demo-style", ASKED) as url, browser_page(url) as page:
        yield page, root


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
