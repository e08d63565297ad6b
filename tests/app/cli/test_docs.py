"""docs/generate.md is generated from the generation settings; this keeps it current."""

from __future__ import annotations

from pathlib import Path

from app.cli.generate import settings_doc

DOC = Path(__file__).resolve().parents[3] / "docs" / "generate.md"


def test_generate_doc_is_current():
    assert DOC.read_text(encoding="utf-8") == settings_doc(), \
        "docs/generate.md is stale: regenerate with `lorastudio settings --markdown > docs/generate.md`"


def test_generate_doc_has_every_limit():
    from trainer.generate.limits import MAX_BATCH, MAX_GRID_CELLS
    text = settings_doc()
    assert f"| `batch` | `--batch` | Images | generate | int | `1` | 1..{MAX_BATCH} |" in text
    assert f"1..{MAX_GRID_CELLS}" in text and "`--cfg`" in text
