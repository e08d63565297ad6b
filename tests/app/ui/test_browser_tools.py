"""The Tools tab in a real browser: one run each of resize, merge, bake and extract on tiny files through
`lorastudio ui` (its own server, no demo), the result line, the command shown, the file on disk, and an existing
output refused until Overwrite is ticked."""

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
def tools_page(tmp_path_factory):
    from tests.fixtures.lora_files import make_lora
    from tests.fixtures.tiny_models import save_tiny_pipeline
    root = tmp_path_factory.mktemp("tools_ui_root")
    (root / "loras").mkdir()
    make_lora(root / "loras" / "a.safetensors", "sd1", seed=1, rank=4)
    make_lora(root / "loras" / "b.safetensors", "sd1", seed=2, rank=2, te=False)
    save_tiny_pipeline(root / "models" / "tiny", "sd1")
    with ui_server(root, tmp_path_factory.mktemp("tools_ui_home")) as url, browser_page(url) as page:
        yield page, root


def run(page, tool: str, says: str) -> None:
    page.locator(f"#t-{tool}-run").click()
    expect(page.locator(f"#t-{tool}-status")).to_contain_text(says, timeout=HANG_MS)


def test_one_run_of_each_tool(tools_page):
    page, root = tools_page
    tools = root / "outputs" / "lora-tools"
    tab(page, "Tools")

    # resize; the same output again is refused beside the button until Overwrite is ticked
    fill(page, "t-resize-lora", str(root / "loras" / "a.safetensors"))
    fill(page, "t-resize-rank", "2")
    run(page, "resize", "wrote outputs/lora-tools/a-r2.safetensors (")
    expect(page.locator("#t-resize-status")).to_contain_text("rank 2: ")
    expect(page.locator("#t-resize-command")).to_contain_text("lorastudio lora resize ")
    expect(page.locator("#t-resize-command")).to_contain_text("--rank 2 --out ")
    first = (tools / "a-r2.safetensors").stat().st_mtime_ns
    run(page, "resize", "exists; tick Overwrite to replace it")
    expect(page.locator("#t-resize-status")).not_to_contain_text("Traceback")
    assert (tools / "a-r2.safetensors").stat().st_mtime_ns == first
    page.locator("#t-resize-overwrite input").check()
    run(page, "resize", "wrote outputs/lora-tools/a-r2.safetensors (")
    expect(page.locator("#t-resize-command")).to_contain_text("--overwrite")

    # merge two LoRAs picked with Add, ranks stacked
    tab(page, "Merge")
    for name in ("a", "b"):
        fill(page, "t-merge-pick", str(root / "loras" / f"{name}.safetensors"))
        page.locator("#t-merge-add").click()
        expect(page.locator("#t-merge-add-status")).to_contain_text(f"added {name}.safetensors")
    page.locator("#t-merge-concat input").check()
    run(page, "merge", "wrote outputs/lora-tools/a+b-merged.safetensors (")
    expect(page.locator("#t-merge-status")).to_contain_text("rank 6: ")
    expect(page.locator("#t-merge-command")).to_contain_text("--concat")
    assert (tools / "a+b-merged.safetensors").is_file()

    # bake a LoRA into the tiny base, then extract it back from the checkpoint
    tab(page, "Bake")
    fill(page, "t-bake-base", str(root / "models" / "tiny"))
    fill(page, "t-bake-loras", "loras/a.safetensors:0.8")
    run(page, "bake", "wrote checkpoint outputs/baked/tiny+a.safetensors (")
    expect(page.locator("#t-bake-command")).to_contain_text("lorastudio lora bake --model ")
    baked = root / "outputs" / "baked" / "tiny+a.safetensors"
    assert baked.is_file()

    tab(page, "Extract")
    fill(page, "t-extract-tuned", str(baked))
    fill(page, "t-extract-base", str(root / "models" / "tiny"))
    fill(page, "t-extract-rank", "4")
    run(page, "extract", "wrote outputs/lora-tools/tiny+a-extracted-r4.safetensors (")
    expect(page.locator("#t-extract-command")).to_contain_text("lorastudio lora extract --tuned ")
    assert (tools / "tiny+a-extracted-r4.safetensors").is_file()
