"""The Dataset tab's caption editor in a real browser (Chromium + Playwright against `lorastudio ui`, no demo).

A folder of 31 drawn pictures: 30 captioned "zxq, <colour> <shape>" and one without a caption, which sorts first.
The tests run in order on one page, like a review session: the grid shows a page of thumbnails; filter by tag and
by text; bulk add and remove a tag on the filtered and on the checked pictures, then Undo; and the keyboard path
(type, Ctrl+Enter, Alt+Right/Alt+Left, over page ends) with the files on disk checked after each step.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.app.ui.test_browser import CHROMIUM, browser_page, fill, shot, ui_server
from tests.fixtures.images import draw_image
from tests.fixtures.waits import HANG_MS

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium at /usr/bin/chromium")]
sync_api = pytest.importorskip("playwright.sync_api")
expect = sync_api.expect
REPO = Path(__file__).resolve().parents[3]
COLOURS, SHAPES, EACH = ("blue", "green", "red"), ("circle", "square"), 5


@pytest.fixture(scope="module")
def editor(tmp_path_factory):
    from app.ui.tabs.caption_editor import DEFAULT_PAGE_SIZE
    root = tmp_path_factory.mktemp("editor_ui_root")
    pics = root / "pics"
    pics.mkdir()
    n = 0
    for colour in COLOURS:
        for shape in SHAPES:
            for k in range(EACH):
                draw_image(64, 64, n).save(pics / f"{colour}_{shape}_{k:02d}.png")
                (pics / f"{colour}_{shape}_{k:02d}.txt").write_text(f"zxq, {colour} {shape}", encoding="utf-8")
                n += 1
    draw_image(64, 64, 99).save(pics / "a_new_00.png")  # no caption yet; first by name
    with ui_server(root, tmp_path_factory.mktemp("editor_ui_home")) as url, browser_page(url) as page:
        yield {"page": page, "root": root, "pics": pics, "per_page": DEFAULT_PAGE_SIZE}


def caption(pics: Path, stem: str) -> str:
    p = pics / f"{stem}.txt"
    return p.read_text(encoding="utf-8").strip() if p.exists() else "(none)"


def shown(page) -> list[str]:
    """The file names of the pictures the grid shows now."""
    return [t.replace(" (no caption)", "").strip()
            for t in page.locator("#ce-grid .ce-cell:visible [id^=ce-pick-]").all_inner_texts()]


def set_tag_box(page, elem_id: str, value: str) -> None:
    box = page.locator(f"#{elem_id} input")
    box.fill(value)
    box.press("Enter")


def focused_cell(page) -> str | None:
    return page.evaluate("(document.activeElement.closest('.ce-cell') || {}).id || null")


def test_the_grid_shows_one_page_of_thumbnails(editor):
    page, pics, per_page = editor["page"], editor["pics"], editor["per_page"]
    fill(page, "ds-folder", str(pics))
    page.locator("#ds-scan").click()
    expect(page.locator("#ds-status")).to_contain_text("31 picture(s)", timeout=HANG_MS)
    expect(page.locator("#ce-page-info")).to_contain_text("Page 1 of 3")
    expect(page.locator("#ce-page-info")).to_contain_text(f"pictures 1-{per_page} of 31")
    expect(page.locator("#ce-grid .ce-cell:visible")).to_have_count(per_page)
    expect(page.locator("#ce-pick-0")).to_contain_text("a_new_00.png (no caption)")
    expect(page.locator("#ce-cap-1 textarea")).to_have_value("zxq, blue circle")
    expect(page.locator("#ce-grid img")).to_have_count(per_page)
    # the browser gets thumbnails of the page only, not 31 pictures (nor the original files)
    thumbs = list((editor["root"] / ".lorastudio-ui" / "thumbs").glob("*.jpg"))
    assert len(thumbs) == per_page, thumbs
    assert all("/pics/" not in (img.get_attribute("src") or "") for img in page.locator("#ce-grid img").all())
    expect(page.locator("#ce-selection")).to_contain_text("all 31 picture(s)")


def test_filter_by_tag_or_text_shows_only_matching_pictures(editor):
    page = editor["page"]
    set_tag_box(page, "ce-filter-tag", "red square")
    expect(page.locator("#ce-page-info")).to_contain_text("pictures 1-5 of 5 (filtered from 31)")
    assert shown(page) == [f"red_square_{k:02d}.png" for k in range(EACH)]
    expect(page.locator("#ce-selection")).to_contain_text("all 5 filtered picture(s)")
    set_tag_box(page, "ce-filter-tag", "purple")  # a tag nobody has
    expect(page.locator("#ce-page-info")).to_contain_text("no picture matches the filter")
    expect(page.locator("#ce-grid .ce-cell:visible")).to_have_count(0)
    page.locator("#ce-show-all").click()
    expect(page.locator("#ce-page-info")).to_contain_text("pictures 1-12 of 31")
    expect(page.locator("#ce-filter-tag input")).to_have_value("")
    fill(page, "ce-filter-text", "green")  # text: any part of the caption (or of the file name)
    page.locator("#ce-filter-text textarea, #ce-filter-text input").first.press("Enter")
    expect(page.locator("#ce-page-info")).to_contain_text("pictures 1-10 of 10 (filtered from 31)")
    assert all(name.startswith("green_") for name in shown(page)) and len(shown(page)) == 10
    fill(page, "ce-filter-text", "")
    page.locator("#ce-filter-text textarea, #ce-filter-text input").first.press("Enter")
    expect(page.locator("#ce-page-info")).to_contain_text("pictures 1-12 of 31")


def test_bulk_add_and_remove_a_tag_on_the_selection_then_undo(editor):
    page, pics = editor["page"], editor["pics"]
    reds = [f"red_square_{k:02d}" for k in range(EACH)]
    set_tag_box(page, "ce-filter-tag", "red square")
    expect(page.locator("#ce-page-info")).to_contain_text("of 5 (filtered from 31)")
    set_tag_box(page, "ce-tag", "shiny")
    page.locator("#ce-add").click()
    expect(page.locator("#ce-status")).to_contain_text("add tags shiny on 5 picture(s): 5 caption(s) changed")
    assert [caption(pics, s) for s in reds] == ["zxq, red square, shiny"] * EACH
    assert caption(pics, "red_circle_00") == "zxq, red circle"  # outside the filter: untouched
    expect(page.locator("#ce-cap-0 textarea")).to_have_value("zxq, red square, shiny")
    # the tag boxes complete from the folder's own tag frequencies, the new tag included
    page.locator("#ce-tag input").fill("shi")
    expect(page.get_by_role("option", name="shiny (5)")).to_be_visible()
    page.keyboard.press("Escape")
    set_tag_box(page, "ce-tag", "shiny")
    page.locator("#ce-remove").click()
    expect(page.locator("#ce-status")).to_contain_text("remove tags shiny on 5 picture(s): 5 caption(s) changed")
    assert [caption(pics, s) for s in reds] == ["zxq, red square"] * EACH
    page.locator("#ce-undo").click()
    expect(page.locator("#ce-status")).to_contain_text("undo remove tags shiny on 5 picture(s)")
    assert [caption(pics, s) for s in reds] == ["zxq, red square, shiny"] * EACH
    expect(page.locator("#ce-cap-4 textarea")).to_have_value("zxq, red square, shiny")
    page.locator("#ce-undo").click()
    expect(page.locator("#ce-status")).to_contain_text("undo add tags shiny")
    assert [caption(pics, s) for s in reds] == ["zxq, red square"] * EACH

    # checked pictures are the selection when there are any (here two of the five)
    page.locator("#ce-pick-1 input").check()
    page.locator("#ce-pick-3 input").check()
    expect(page.locator("#ce-selection")).to_contain_text("2 checked")
    set_tag_box(page, "ce-tag", "glossy")
    page.locator("#ce-add").click()
    expect(page.locator("#ce-status")).to_contain_text("add tags glossy on 2 picture(s)")
    assert [caption(pics, s).endswith("glossy") for s in reds] == [False, True, False, True, False]
    page.locator("#ce-undo").click()
    expect(page.locator("#ce-status")).to_contain_text("undo add tags glossy")
    assert [caption(pics, s) for s in reds] == ["zxq, red square"] * EACH
    page.locator("#ce-clear").click()
    expect(page.locator("#ce-selection")).to_contain_text("all 5 filtered picture(s)")
    page.locator("#ce-show-all").click()
    expect(page.locator("#ce-page-info")).to_contain_text("pictures 1-12 of 31")


def test_keyboard_review_type_save_and_move_without_the_mouse(editor):
    page, pics, per_page = editor["page"], editor["pics"], editor["per_page"]
    url = page.url
    expect(page.locator("#ds-summary")).to_contain_text("no caption file: 1")
    page.locator("#ce-cap-0 textarea").click()
    page.keyboard.type("zxq, yellow star")
    page.keyboard.press("Control+Enter")
    expect(page.locator("#ce-status")).to_contain_text("saved the caption of a_new_00.png")
    assert caption(pics, "a_new_00") == "zxq, yellow star"
    expect(page.locator("#ds-summary")).not_to_contain_text("no caption file")  # the scan report follows
    expect(page.locator("#ce-pick-0")).not_to_contain_text("(no caption)")

    page.keyboard.press("Alt+ArrowRight")  # next picture: the caret is at the end of its caption
    assert focused_cell(page) == "ce-cell-1"
    page.keyboard.type(", striped")
    page.keyboard.press("Control+Enter")
    expect(page.locator("#ce-status")).to_contain_text("saved the caption of blue_circle_00.png")
    assert caption(pics, "blue_circle_00") == "zxq, blue circle, striped"
    page.keyboard.press("Alt+ArrowLeft")
    assert focused_cell(page) == "ce-cell-0"
    page.keyboard.press("Alt+ArrowLeft")  # the first picture of the first page: stays
    assert focused_cell(page) == "ce-cell-0"
    assert page.url == url  # Alt+Left is not the browser's Back here

    # over the page end: the last picture's unsaved typing is saved, the next page's first caption has the caret
    for _ in range(per_page - 1):
        page.keyboard.press("Alt+ArrowRight")
    assert focused_cell(page) == f"ce-cell-{per_page - 1}"
    last = shown(page)[-1].removesuffix(".png")
    page.keyboard.type(", seen")
    page.keyboard.press("Alt+ArrowRight")
    expect(page.locator("#ce-page-info")).to_contain_text("Page 2 of 3")
    expect(page.locator("#ce-status")).to_contain_text(f"saved the caption of {last}.png")
    assert caption(pics, last).endswith(", seen")
    page.wait_for_function("document.activeElement && document.activeElement.closest('#ce-cell-0')")
    page.keyboard.press("Alt+ArrowLeft")  # and back: the previous page's last caption
    expect(page.locator("#ce-page-info")).to_contain_text("Page 1 of 3")
    page.wait_for_function(f"document.activeElement && document.activeElement.closest('#ce-cell-{per_page - 1}')")
    assert caption(pics, "blue_circle_00") == "zxq, blue circle, striped"

    # each save is one step of Undo
    page.locator("#ce-undo").click()
    expect(page.locator("#ce-status")).to_contain_text(f"undo edit the caption of {last}.png")
    assert not caption(pics, last).endswith(", seen")
    expect(page.locator(f"#ce-cap-{per_page - 1} textarea")).to_have_value(caption(pics, last))
    shot(page, "caption-editor.png", "#ce-keys", "#ce-grid")


def test_the_docs_give_the_page_sizes_the_editor_offers():
    from app.ui.tabs.caption_editor import PAGE_SIZES
    *first, final = (str(n) for n in PAGE_SIZES)
    assert f"{', '.join(first)} or {final} per page" in (REPO / "docs" / "gui.md").read_text(encoding="utf-8")
    assert f"({'/'.join(map(str, PAGE_SIZES))})" in (REPO / "README.md").read_text(encoding="utf-8")
