"""The Dataset tab's Masks section in a real browser (`lorastudio ui`, its own server, no demo): masks from a
prompt with a tiny random CLIPSeg, shown over the pictures; kept on a second run; the alpha mode writes the alpha
exactly; a wrong model is one line beside the button; Use for training fills the Train tab's data.mask_dir."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.app.ui.test_browser import CHROMIUM, browser_page, field, fill, tab, ui_server
from tests.fixtures.waits import HANG_MS

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium at /usr/bin/chromium")]
sync_api = pytest.importorskip("playwright.sync_api")
expect = sync_api.expect
REPO = Path(__file__).resolve().parents[3]
SIZES = {"a": (64, 48), "b": (40, 90), "c": (50, 50)}


def _alpha() -> np.ndarray:
    a = np.zeros((48, 64), np.uint8)
    a[8:40, 10:50] = 255
    a[8:40, 10] = 100
    return a


@pytest.fixture(scope="module")
def masks_page(tmp_path_factory):
    from tests.fixtures.dataset_images import pattern_image
    from tests.fixtures.tiny_clipseg import save_tiny_clipseg
    root = tmp_path_factory.mktemp("masks_ui_root")
    data = root / "pictures"
    data.mkdir()
    rgba = pattern_image(*SIZES["a"], 1).convert("RGBA")
    rgba.putalpha(Image.fromarray(_alpha(), "L"))
    rgba.save(data / "a.png")
    pattern_image(*SIZES["b"], 2).save(data / "b.png")
    pattern_image(*SIZES["c"], 3).save(data / "c.jpg", quality=90)
    model = save_tiny_clipseg(root / "models" / "tiny-clipseg")
    with ui_server(root, tmp_path_factory.mktemp("masks_ui_home")) as url, browser_page(url) as page:
        yield page, data, model


def make(page) -> None:
    page.locator("#mk-run").click()


def test_masks_from_a_prompt_the_alpha_and_a_wrong_model(masks_page):
    page, data, model = masks_page
    status = page.locator("#mk-status")
    tab(page, "Dataset")
    fill(page, "ds-folder", str(data))
    page.locator("#mk-accordion").get_by_text("Masks (what each picture trains").click()
    fill(page, "mk-prompt", "the character")
    fill(page, "mk-model", str(model))
    fill(page, "mk-grow", "2")

    # a prompt: one mask per picture at its size, shown over the pictures
    make(page)
    expect(status).to_contain_text(f"wrote 3 mask(s) in {data / 'masks'}, kept 0 existing", timeout=HANG_MS)
    expect(page.locator("#mk-gallery img")).to_have_count(3)
    for stem, size in SIZES.items():
        m = Image.open(data / "masks" / f"{stem}.png")
        assert m.mode == "L" and m.size == size

    # a second run keeps them and says how to redo them
    make(page)
    expect(status).to_contain_text("kept 3 existing (tick Replace existing masks to redo them)", timeout=HANG_MS)

    # the alpha channel (grow back to 0), into another folder: exact; a picture without transparency is named
    page.locator("#mk-alpha input").check()
    fill(page, "mk-grow", "0")
    fill(page, "mk-out", str(data.parent / "alpha-masks"))
    make(page)
    expect(status).to_contain_text("wrote 1 mask(s)", timeout=HANG_MS)
    expect(status).to_contain_text("b.png: has no alpha channel")
    assert (np.asarray(Image.open(data.parent / "alpha-masks" / "a.png")) == _alpha()).all()
    expect(page.locator("#mk-gallery img")).to_have_count(1)

    # a wrong model: one line beside the button, nothing written
    page.locator("#mk-alpha input").uncheck()
    page.locator("#mk-overwrite input").check()
    fill(page, "mk-out", "")
    fill(page, "mk-model", str(data))
    make(page)
    expect(status).to_contain_text("is not a CLIPSeg model folder or hub id", timeout=HANG_MS)
    expect(status).not_to_contain_text("Traceback")

    # the masks become the Train tab's data.mask_dir
    page.locator("#mk-use").click()
    expect(status).to_contain_text("data.mask_dir (Train tab) is now", timeout=HANG_MS)
    tab(page, "Train")
    page.locator("#tr-advanced").click()
    eid = field(page, "data.mask_dir")
    box = page.locator(f"#{eid} textarea, #{eid} input").first
    expect(box).to_have_value(re.compile(re.escape(str(data / "masks")) + "$"))
