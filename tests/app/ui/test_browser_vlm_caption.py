"""The Dataset tab's "Caption the pictures" with a chat VLM, in a real browser (`lorastudio ui`, its own server):
the vlm captioner from the dropdown, a tiny random LLaVA folder, an instruction of the user's own; a picture the
model cannot read is named in the status and gets no caption; a tagger folder given as a VLM is one line."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.app.ui.test_browser import CHROMIUM, browser_page, fill, tab, ui_server
from tests.fixtures.waits import HANG_MS

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium at /usr/bin/chromium")]
sync_api = pytest.importorskip("playwright.sync_api")
expect = sync_api.expect
REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def vlm_page(tmp_path_factory):
    from tests.datasets_tools.test_captioners import build_tiny_wd14
    from tests.datasets_tools.tiny_vlms import build_llava
    from tests.fixtures.dataset_images import pattern_image
    root = tmp_path_factory.mktemp("vlm_ui_root")
    data = root / "pictures"
    data.mkdir()
    for i in range(3):
        pattern_image(32, 32, i).save(data / f"p{i}.png")
    pattern_image(48, 40, 7).save(data / "odd.png")
    models = {"llava": build_llava(root / "models" / "llava", resize=False),  # fixed 32 px: odd.png is unreadable
              "wd14": build_tiny_wd14(root / "models" / "wd14", size=32)}
    with ui_server(root, tmp_path_factory.mktemp("vlm_ui_home")) as url, browser_page(url) as page:
        yield page, data, models


def test_caption_with_a_vlm_and_its_instruction(vlm_page):
    page, data, models = vlm_page
    tab(page, "Dataset")
    fill(page, "ds-folder", str(data))
    page.locator("#cap-name input").click()
    page.get_by_role("option", name="vlm", exact=True).click()
    status = page.locator("#cap-status")
    # a tagger folder as a VLM: one line beside the button, nothing written
    fill(page, "cap-model", str(models["wd14"]))
    page.locator("#cap-run").click()
    expect(status).to_contain_text("WD14 tagger folder", timeout=HANG_MS)
    expect(status).to_contain_text("wd14")
    assert not list(data.glob("*.txt"))
    # the tiny LLaVA with the user's instruction and trigger
    fill(page, "cap-model", str(models["llava"]))
    fill(page, "cap-prompt", "Name the colours.")
    fill(page, "cap-trigger", "zxq")
    page.locator("#cap-run").click()
    expect(status).to_contain_text("captioned 3 image(s)", timeout=HANG_MS)
    expect(status).to_contain_text("1 not captioned (no file written): odd.png")
    assert sorted(p.name for p in data.glob("*.txt")) == ["p0.txt", "p1.txt", "p2.txt"]
    assert all(p.read_text(encoding="utf-8").startswith("zxq, ") for p in data.glob("*.txt"))
