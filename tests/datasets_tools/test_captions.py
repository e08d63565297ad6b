"""Caption edits: prefix, replace, remove, dedupe, frequencies, backups and undo, read-only folders."""

from __future__ import annotations

import pytest
from tests.fixtures.dataset_images import pattern_image, read_only

from datasets_tools import captions as C
from datasets_tools.errors import DatasetError


@pytest.fixture
def ds(tmp_path):
    root = tmp_path / "ds"
    (root / "5_zxq").mkdir(parents=True)
    for name, cap in [("a", "1girl, long_hair, 1girl, smile"), ("b", "1girls, cat"), ("c", None)]:
        pattern_image(64, 64, ord(name)).save(root / "5_zxq" / f"{name}.png")
        if cap is not None:
            (root / "5_zxq" / f"{name}.txt").write_text(cap, encoding="utf-8")
    pattern_image(64, 64, 7).save(root / "d.jpg")
    (root / "d.txt").write_text("a man standing, a man", encoding="utf-8")
    return root


def _caps(root):
    return {p.relative_to(root).as_posix(): p.read_text(encoding="utf-8") for p in sorted(root.rglob("*.txt"))
            if ".lorastudio_backup" not in p.parts}


def test_add_prefix_no_duplicates_and_creates_missing(ds):
    res = C.add_prefix(ds, "zxq style")
    caps = _caps(ds)
    assert caps["5_zxq/a.txt"] == "zxq style, 1girl, long_hair, 1girl, smile"
    assert caps["5_zxq/c.txt"] == "zxq style"
    assert res.created == ["5_zxq/c.txt"] and len(res.changed) == 4 and res.backup
    again = C.add_prefix(ds, "zxq style")
    assert again.changed == [] and again.backup is None  # idempotent, no empty backup
    (ds / "d.txt").write_text("a man, zxq style", encoding="utf-8")
    C.add_prefix(ds, "zxq style")
    assert _caps(ds)["d.txt"] == "zxq style, a man"  # moved to the front, not doubled


def test_replace_whole_words(ds):
    C.replace_text(ds, "1girl", "woman")
    caps = _caps(ds)
    assert caps["5_zxq/a.txt"] == "woman, long_hair, woman, smile"
    assert caps["5_zxq/b.txt"] == "1girls, cat"  # '1girls' is another tag
    C.replace_text(ds, "a man", "zxq man")
    assert _caps(ds)["d.txt"] == "zxq man standing, zxq man"
    C.replace_text(ds, "smile", "")
    assert _caps(ds)["5_zxq/a.txt"] == "woman, long_hair, woman"
    assert C.parse_replacement("1girl=>woman") == ("1girl", "woman")
    with pytest.raises(DatasetError):
        C.parse_replacement("no arrow")


def test_remove_and_dedupe(ds):
    C.remove_tags(ds, ["long hair", "CAT"])  # underscores/spaces and case are the same tag
    caps = _caps(ds)
    assert caps["5_zxq/a.txt"] == "1girl, 1girl, smile" and caps["5_zxq/b.txt"] == "1girls"
    C.dedupe_tags(ds)
    assert _caps(ds)["5_zxq/a.txt"] == "1girl, smile"


def test_tag_frequency_kohya_shape(ds):
    freq = C.tag_frequency(ds)
    assert freq == {"5_zxq": {"1girl": 2, "1girls": 1, "cat": 1, "long_hair": 1, "smile": 1},
                    "ds": {"a man": 1, "a man standing": 1}}
    assert C.total_frequency(freq)[0] == ("1girl", 2)
    assert "1girl" in C.format_frequency(freq)


def test_undo_steps_back_one_edit_at_a_time(ds):
    original = _caps(ds)
    C.add_prefix(ds, "zxq")
    after_prefix = _caps(ds)
    C.dedupe_tags(ds)
    assert _caps(ds) != after_prefix
    r = C.undo(ds)
    assert _caps(ds) == after_prefix and "dedupe" in r.operation
    r = C.undo(ds)
    assert _caps(ds) == original and r.deleted == ["5_zxq/c.txt"]  # the created caption is gone again
    with pytest.raises(DatasetError, match="nothing to undo"):
        C.undo(ds)


def test_dry_run_writes_nothing(ds):
    before = _caps(ds)
    res = C.add_prefix(ds, "zxq", dry_run=True)
    assert _caps(ds) == before and len(res.changed) == 4 and res.created == ["5_zxq/c.txt"]
    assert not (ds / C.BACKUP_DIR).exists()


def test_read_only_folder_one_line_and_nothing_written(ds):
    before = _caps(ds)
    with read_only(ds / "5_zxq"):
        with pytest.raises(DatasetError) as ei:
            C.add_prefix(ds, "zxq")
    msg = str(ei.value)
    assert "5_zxq" in msg and "\n" not in msg and "nothing was changed" in msg
    assert _caps(ds) == before
    assert not (ds / C.BACKUP_DIR).exists() or not any((ds / C.BACKUP_DIR).iterdir())


def test_atomic_write_leaves_no_temp_files(tmp_path):
    p = tmp_path / "x.txt"
    C.atomic_write_text(p, "hello")
    C.atomic_write_text(p, "world")
    assert p.read_text() == "world" and [f.name for f in tmp_path.iterdir()] == ["x.txt"]
    # Not mkstemp's 0600: a new file gets the umask's mode, an existing one keeps its own.
    import os

    mask = os.umask(0o022)
    try:
        C.atomic_write_text(tmp_path / "new.txt", "x")
        assert (tmp_path / "new.txt").stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(mask)
    p.chmod(0o640)
    C.atomic_write_text(p, "again")
    assert p.stat().st_mode & 0o777 == 0o640


@pytest.mark.parametrize("edit", ["add_prefix", "replace", "remove_tags", "dedupe", "chain"])
def test_edits_skip_what_the_scan_calls_unusable(tmp_path, edit):
    """No edit creates or changes the caption of a file the scan calls unusable; the summary names each one."""
    from tests.datasets_tools.unusable_files import UNUSABLE, assert_names_every_unusable, make_unusable_folder

    root = make_unusable_folder(tmp_path / "ds")
    old = "cat, cat, zxq"
    for name in ("good_a", "truncated", "text"):  # truncated.png and truncated.jpg share truncated.txt
        (root / f"{name}.txt").write_text(old, encoding="utf-8")
    res = {
        "add_prefix": lambda: C.add_prefix(root, "zxq style"),
        "replace": lambda: C.replace_text(root, "cat", "dog"),
        "remove_tags": lambda: C.remove_tags(root, ["zxq"]),
        "dedupe": lambda: C.dedupe_tags(root),
        "chain": lambda: C.edit_captions(root, [C.replace_transform("cat", "dog"), C.prefix_transform("zxq")],
                                         operation="chain", create_missing=True),
    }[edit]()
    assert (root / "truncated.txt").read_text(encoding="utf-8") == old
    assert (root / "text.txt").read_text(encoding="utf-8") == old
    assert not (root / "empty.txt").exists()
    assert (root / "good_a.txt").read_text(encoding="utf-8") != old and "good_a.txt" in res.changed
    assert not any(r.startswith(("truncated", "text", "empty")) for r in res.changed + res.created)
    assert sorted(p.path for p in res.skipped) == sorted(UNUSABLE)
    assert_names_every_unusable(res.summary())
    dry = C.add_prefix(root, "another", dry_run=True)
    assert sorted(dry.changed) == ["good_a.txt", "good_b.txt"] and len(dry.skipped) == len(UNUSABLE)


# ---------------------------------------------------------------------------------------------- caption editor
def test_add_and_remove_tags_on_a_selection_only(ds):
    """The editor's bulk edit: only the chosen pictures change, missing captions are created, one undo each."""
    before = _caps(ds)
    res = C.add_tags(ds, ["Long Hair", "shiny"], only=["5_zxq/a.png", "5_zxq/c.png"])
    caps = _caps(ds)
    assert caps["5_zxq/a.txt"] == "1girl, long_hair, 1girl, smile, shiny"  # 'Long Hair' is long_hair already
    assert caps["5_zxq/c.txt"] == "Long Hair, shiny"                      # created, undo deletes it again
    assert caps["5_zxq/b.txt"] == before["5_zxq/b.txt"] and caps["d.txt"] == before["d.txt"]
    assert res.created == ["5_zxq/c.txt"] and "on 2 picture(s)" in res.summary()
    again = C.add_tags(ds, ["shiny"], only=["5_zxq/a.png"])
    assert again.changed == [] and again.backup is None  # nothing to add: no backup, no undo step
    C.remove_tags(ds, ["shiny"], only=["5_zxq/c.png"])
    assert _caps(ds)["5_zxq/c.txt"] == "Long Hair" and "shiny" in _caps(ds)["5_zxq/a.txt"]
    C.undo(ds)
    assert _caps(ds) == caps
    C.undo(ds)
    assert _caps(ds) == before
    assert C.add_tags(ds, ["x"], only=[]).changed == []  # an empty selection edits nothing (not everything)
    with pytest.raises(DatasetError, match="no tags given to add"):
        C.add_tags_transform([" , "])


def test_caption_matches_tags_and_text():
    cap = "zxq, Long_Hair, red square"
    assert C.caption_matches(cap)
    assert C.caption_matches(cap, tags=["long hair"]) and C.caption_matches(cap, tags=["RED SQUARE", "zxq"])
    assert not C.caption_matches(cap, tags=["red"])  # a tag is a whole tag ...
    assert C.caption_matches(cap, text="red")        # ... text is any part of the caption
    assert C.caption_matches(cap, text="red  SQUARE") and not C.caption_matches(cap, text="blue")
    assert C.caption_matches("", text="square_01", name="sub/red_square_01.png")  # or of the file name
    assert not C.caption_matches(cap, tags=["zxq"], text="circle")
