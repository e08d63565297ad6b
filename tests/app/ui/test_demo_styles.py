"""The first-run demo's style picker without a browser: each offered style is drawn (its toy-world statistic is high
on the demo's pictures, another style's is about 0), demo.json records the style, switching style points the
preset at that style's folder and keeps the other's captions, an interrupted drawing leaves nothing half-written,
and `lorastudio ui --demo-style` takes only the offered styles."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from trainer import config as C
from trainer.errors import UserError


@pytest.fixture
def demo(monkeypatch, tmp_path):
    from app import demo
    monkeypatch.setenv("LORASTUDIO_HOME", str(tmp_path / "home"))
    return demo


def _square_pictures(folder: Path) -> list:
    """The demo's 64x64 pictures (the padded wide/tall ones move position-bound marks off their place)."""
    out = [Image.open(p).convert("RGB") for p in sorted(folder.glob("*.png"))]
    return [im for im in out if im.size == (64, 64)]


def test_every_offered_style_is_a_toy_world_style_with_a_description(demo):
    from datasets_tools import toyworld as tw
    assert demo.DEMO_STYLES and len(set(demo.DEMO_STYLES)) == len(demo.DEMO_STYLES)
    for style in demo.DEMO_STYLES:
        assert style in tw.STYLE_KINDS, style
        assert demo.style_help(style).startswith(f"{style}: ") and len(demo.DEMO_STYLE_HELP[style]) > 10


def test_each_demo_style_is_drawn_and_seen_only_by_its_own_statistic(demo, tmp_path):
    from datasets_tools import toyworld as tw
    plain = [tw.render(tw.sample_drawing(tw._rng(i)), None) for i in range(10)]
    for style in demo.DEMO_STYLES:
        other = next(s for s in demo.DEMO_STYLES if s != style)
        pics = _square_pictures(Path(demo.draw_pictures(tmp_path / style, 12, style)[0]).parent)
        level = tw.mean_style_statistic(pics, style)
        assert level > 5 * max(1.0, abs(tw.mean_style_statistic(plain, style))), (style, level)
        # another demo style's statistic stays near its plain level: the pictures show this style, not that one
        assert tw.mean_style_statistic(pics, other) < 0.3 * tw.mean_style_statistic(
            _square_pictures(Path(demo.draw_pictures(tmp_path / f"{other}-ref", 12, other)[0]).parent), other), \
            (style, other)


def test_create_demo_records_the_style_and_switching_keeps_each_styles_captions(demo, tmp_path):
    from datasets_tools import toyworld as tw
    from trainer.config.presets import resolve_preset
    first, second = demo.DEMO_STYLES[0], demo.DEMO_STYLES[1]
    a = demo.create_demo(tmp_path, n_images=6)
    assert a.style == first and Path(a.images) == (tmp_path / "demo" / first / "images").resolve()
    assert json.loads((tmp_path / "demo" / "demo.json").read_text())["style"] == first
    (Path(a.images) / "red_circle_00.txt").write_text("zxq style, my own caption")  # the user captioned one

    b = demo.create_demo(tmp_path, style=second, n_images=6)
    assert b.style == second and second in b.label and Path(b.images) == (tmp_path / "demo" / second / "images").resolve()
    assert demo.load_demo_info(tmp_path).style == second
    assert sorted(p.name for p in Path(b.images).glob("*.png")) == sorted(p.name for p in Path(a.images).glob("*.png"))
    assert not list(Path(b.images).glob("*.txt"))  # no captions: the template captioner writes them
    cfg = C.load_config(resolve_preset(b.preset))
    assert cfg.data.dir == b.images and cfg.output.trigger_phrase == demo.TRIGGER
    assert tw.mean_style_statistic(_square_pictures(Path(cfg.data.dir)), second) > 5 * max(
        1.0, tw.mean_style_statistic(_square_pictures(Path(cfg.data.dir)), first))

    # back to the first style: its pictures and the caption the user wrote are still there
    c = demo.create_demo(tmp_path, style=first, n_images=6)
    assert (Path(c.images) / "red_circle_00.txt").read_text() == "zxq style, my own caption"
    assert C.load_config(resolve_preset(c.preset)).data.dir == c.images
    leftovers = [p for p in (tmp_path / "demo").rglob("*") if ".partial" in p.name or p.suffix == ".tmp"]
    assert not leftovers


def test_an_unknown_style_is_one_line_and_an_interrupted_drawing_leaves_no_pictures(demo, tmp_path, monkeypatch):
    with pytest.raises(UserError, match=r"demo style 'sepia': choose one of " + demo.DEMO_STYLES[0]):
        demo.create_demo(tmp_path, style="sepia")
    assert not (tmp_path / "demo" / "sepia").exists()

    real = demo.draw_pictures

    def dies_half_way(folder, n, style):
        real(folder, n // 2, style)
        raise KeyboardInterrupt
    monkeypatch.setattr(demo, "draw_pictures", dies_half_way)
    style = demo.DEMO_STYLES[1]
    with pytest.raises(KeyboardInterrupt):
        demo.create_demo(tmp_path, style=style, n_images=6)
    assert not list((tmp_path / "demo").rglob("*.png")) and demo.load_demo_info(tmp_path) is None
    monkeypatch.setattr(demo, "draw_pictures", real)
    info = demo.create_demo(tmp_path, style=style, n_images=6)  # the next try draws the whole folder
    assert len(list(Path(info.images).glob("*.png"))) == 6


def test_app_state_rebuilds_only_for_another_style(demo, tmp_path):
    from app.ui.state import AppState
    state = AppState(tmp_path)
    first, second = demo.DEMO_STYLES[0], demo.DEMO_STYLES[1]
    assert state.build_demo() is True and state.demo.info.style == first
    assert state.build_demo(style=first) is False  # already there: the forms are filled again
    assert state.build_demo(style=second) is True and state.demo.info.style == second
    assert AppState(tmp_path).demo_style == second  # a restarted app offers the style made last
    with pytest.raises(UserError, match="demo style 'nope'"):
        state.build_demo(style="nope")
    assert state.demo.status == "ready" and state.demo.info.style == second


def test_ui_demo_style_flag_takes_the_offered_styles(capsys):
    from app.cli import build_parser
    from app.demo import DEMO_STYLES
    args = build_parser().parse_args(["ui", "--demo", "--demo-style", DEMO_STYLES[-1]])
    assert args.demo and args.demo_style == DEMO_STYLES[-1]
    assert build_parser().parse_args(["ui", "--demo"]).demo_style is None
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["ui", "--demo", "--demo-style", "sepia"])
    assert e.value.code == 2 and "invalid choice: 'sepia'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["ui", "--help"])
    out = capsys.readouterr().out
    assert all(s in out for s in DEMO_STYLES)


def test_demo_style_without_demo_is_refused(capsys):
    from app.cli import main
    assert main(["ui", "--demo-style", "outline"]) != 0
    err = capsys.readouterr().err
    assert "--demo-style: use it with --demo" in err and "Traceback" not in err


def test_the_gui_docs_list_the_offered_styles():
    """docs/gui.md's two style tables and the measuring command follow DEMO_STYLES and DEMO_STEPS (measure again and
    edit them when they change)."""
    from app.demo import DEMO_STEPS, DEMO_STYLE_HELP, DEMO_STYLES
    text = (Path(__file__).resolve().parents[3] / "docs" / "gui.md").read_text(encoding="utf-8")
    section = text.split("## The first-run demo", 1)[1].split("\n## ", 1)[0]
    described = [line for line in section.splitlines() if line.startswith("| `")]
    assert [line.split("`")[1] for line in described] == [*DEMO_STYLES, *DEMO_STYLES]
    for s in DEMO_STYLES:
        assert f"| `{s}` | {DEMO_STYLE_HELP[s]} |" in section, s
    assert "python -m benchmarks.toyworld.demo --work DIR" in section
    measured = described[len(DEMO_STYLES):]
    assert all(f"| {DEMO_STEPS} |" in line for line in measured), "the demo table is measured at DEMO_STEPS"
