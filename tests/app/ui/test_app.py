"""The web app without a browser: no torch on import, the schema-generated form, checks before Start, launching.

Start-up time is a benchmark (benchmarks/ui_startup.py), not a test: here only what cannot flake."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from trainer import config as C
from trainer.errors import UserError
from tests.fixtures.waits import HANG_S

REPO = Path(__file__).resolve().parents[3]


def test_importing_the_app_does_not_import_torch():
    code = "import app.ui.app, app.ui.jobs, app.ui.state, app.ui.form, app.demo, app.cli.ui, sys; assert 'torch' not in sys.modules, 'torch'"
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=HANG_S,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr


def test_form_is_the_schema_basic_fields_first():
    from app.ui import form as ui
    assert {fi.key for fi in ui.FORM_FIELDS} == set(C.FIELDS)
    assert len(ui.FORM_FIELDS) == len(C.FIELDS)
    n_basic = sum(fi.basic for fi in C.FIELDS.values())
    assert all(fi.basic for fi in ui.FORM_FIELDS[:n_basic]) and not any(fi.basic for fi in ui.FORM_FIELDS[n_basic:])


def test_form_round_trips_every_shipped_preset():
    from app.ui import form as ui
    from trainer.config.presets import list_presets
    for p in list_presets():
        cfg = C.load_config(p.path)
        back, errors = ui.form_to_config(ui.config_to_form(cfg))
        assert not errors, (p.name, errors)
        assert C.config_to_dict(back) == C.config_to_dict(cfg), p.name


def test_form_errors_name_the_field():
    from app.ui import form as ui
    values = ui.config_to_form(C.default_config())
    keys = [fi.key for fi in ui.FORM_FIELDS]
    values[keys.index("train.max_steps")] = "abc"
    values[keys.index("train.learning_rate")] = "-1"
    values[keys.index("data.caption_dropout")] = "1.5"
    values[keys.index("sample.prompts")] = "a red circle\n\n  a blue square  "
    cfg, errors = ui.form_to_config(values)
    assert set(errors) == {"train.max_steps", "train.learning_rate", "data.caption_dropout"}
    assert "expected int" in errors["train.max_steps"]
    assert "below the minimum" in errors["train.learning_rate"]
    assert cfg.sample.prompts == ["a red circle", "a blue square"]
    assert all("\n" not in e for e in errors.values())


def test_checks_before_start(tmp_path):
    from app.ui.tabs import train as ui
    cfg = C.default_config()
    errors = ui.check_before_start(cfg)
    assert "model.base" in errors and "not set" in errors["model.base"]
    cfg.model.base = str(tmp_path / "nope")
    cfg.data.dir = str(tmp_path / "missing")
    errors = ui.check_before_start(cfg)
    assert "not found" in errors["model.base"] and "folder not found" in errors["data.dir"]
    cfg.model.base = "runwayml/stable-diffusion-v1-5"  # a hub id is fine (the trainer fetches or names it)
    (tmp_path / "imgs").mkdir()
    cfg.data.dir = str(tmp_path / "imgs")
    cfg.output.name = "a/b"
    assert set(ui.check_before_start(cfg)) == {"output.name"}


def test_loading_a_preset_keeps_the_users_paths(tmp_path):
    from app.ui.form import FORM_FIELDS, config_to_form
    from app.ui.state import AppState
    from app.ui.tabs import train as ui
    state = AppState(tmp_path)
    values = config_to_form(C.default_config())
    keys = [fi.key for fi in FORM_FIELDS]
    values[keys.index("model.base")] = "/models/sd15"
    values[keys.index("data.dir")] = "/data/cats"
    values[keys.index("train.max_steps")] = "7"
    new, note = ui.load_preset_into_form(state, "preset:sd15-style", values)
    assert new[keys.index("model.base")] == "/models/sd15" and new[keys.index("data.dir")] == "/data/cats"
    assert new[keys.index("train.max_steps")] == "1500"  # from the preset, not the old form
    assert "kept your model.base, data.dir" in note
    with pytest.raises(UserError, match="preset not found"):
        ui.load_preset_into_form(state, "preset:no-such", values)


def test_demo_pictures_and_preset(tmp_path, monkeypatch):
    from app import demo
    monkeypatch.setenv("LORASTUDIO_HOME", str(tmp_path / "home"))
    paths = demo.draw_pictures(tmp_path / "pics", 12)
    assert len(paths) == 12 and all(p.suffix == ".png" and p.stem.count("_") == 2 for p in paths)
    from PIL import Image
    sizes = {Image.open(p).size for p in paths}
    assert (64, 64) in sizes and len(sizes) == 3  # square, wide and tall: the bucket preview has crops to show
    preset = demo.write_demo_preset(tmp_path / "model", tmp_path / "pics", tmp_path / "outputs", tmp_path / "reg")
    cfg = C.load_config(preset)
    assert cfg.data.resolution == 64 and cfg.model.base == str(tmp_path / "model")
    assert cfg.data.reg_dir == str(tmp_path / "reg")


def test_demo_on_the_toy_world_uses_the_shipped_preset_and_regularisation(tmp_path, monkeypatch):
    """The demo uses the pretrained toy-world base, the shipped toyworld-style preset and a folder of plain
    pictures as regularisation (without them the style leaks: docs/toyworld.md, phase 2)."""
    from app import demo
    monkeypatch.setenv("LORASTUDIO_HOME", str(tmp_path / "home"))
    assert demo.toyworld_available()
    info = demo.create_demo(tmp_path)
    assert info.pretrained and "toy-world" in info.label and info.model == str(demo.TOYWORLD_MODEL)
    from trainer.config.presets import resolve_preset
    cfg = C.load_config(resolve_preset(info.preset))
    shipped = C.load_config(REPO / "presets" / "toyworld-style.toml")
    reg = Path(cfg.data.reg_dir)
    assert reg.is_dir() and len(list(reg.glob("*.png"))) == 30 and len(list(reg.glob("*.txt"))) == 30
    assert all("zxq" not in t.read_text() for t in reg.glob("*.txt"))  # ordinary captions, no trigger
    for key in ("lora.rank", "train.learning_rate", "train.batch_size", "data.caption_dropout", "lora.conv_rank"):
        sec, name = key.split(".")
        assert getattr(getattr(cfg, sec), name) == getattr(getattr(shipped, sec), name), key
    assert cfg.sample.prompts[-1] == "yellow triangle"  # no trigger: the sample that should stay plain
    # the samples use the caption form the walk-through writes ("<trigger>, red circle"), which the LoRA learns
    assert cfg.sample.prompts[0] == "zxq style, red circle" and len(list(Path(info.images).glob("*.png"))) == 30


def test_auth_argument():
    from app.cli.ui import parse_auth
    assert parse_auth("me:secret:x") == ("me", "secret:x")
    assert parse_auth(None) is None
    for bad in ("nopass", ":x", "me:"):
        with pytest.raises(UserError, match="USER:PASS"):
            parse_auth(bad)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_ui(tmp_path, *extra):
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False",
           "LORASTUDIO_HOME": str(tmp_path / "home")}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "ui", "--root", str(tmp_path / "root"), "--port",
                             str(port), *extra], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    return proc, port, t0


def _wait(url, proc, timeout=HANG_S, auth_ok=False):
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise AssertionError(proc.stdout.read().decode())
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                return r.status, r.read().decode("utf-8", "replace")
        except urllib.error.HTTPError as e:
            return e.code, ""
        except OSError:
            time.sleep(0.05)
    raise AssertionError("the page was not served")


def test_importing_the_app_skips_gradios_stub_regeneration_and_keeps_its_components():
    """gradio re-writes its .pyi stubs on every import (about half its import time); the app's hook skips only that."""
    code = ("import app.ui.app, gradio as gr, gradio.component_meta as m, os; "
            "print(m.create_or_modify_pyi.__name__, 'torch' in __import__('sys').modules, "
            "len(gr.Textbox.EVENTS) > 0, callable(gr.Gallery.select))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO,
                         env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})
    assert out.stdout.split()[-4:] == ["_no_stub", "False", "True", "True"], out.stdout + out.stderr[-2000:]


def _stop(proc):
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()


def test_lorastudio_ui_serves_the_page_on_localhost_only_without_torch(tmp_path):
    """`lorastudio ui` serves the page, binds 127.0.0.1 only and has not loaded torch.

    How fast is a figure, not a pass/fail (it flaked at 5.3 s against a 5 s budget): benchmarks/ui_startup.py."""
    proc, port, _ = _start_ui(tmp_path)
    try:
        status, body = _wait(f"http://127.0.0.1:{port}/", proc)
        assert status == 200 and "LoRA Studio" in body
        maps = Path(f"/proc/{proc.pid}/maps")
        if maps.exists():  # Linux: the libraries the server process has mapped
            assert "libtorch" not in maps.read_text(), "the web app loaded torch before any model was asked for"
        with socket.socket() as s:  # nothing answers on the machine's other addresses
            s.settimeout(1)
            other = _other_address()
            if other:
                assert s.connect_ex((other, port)) != 0
        # files outside the app's own folders are not served
        status, _ = _wait(f"http://127.0.0.1:{port}/gradio_api/file={REPO / 'pyproject.toml'}", proc)
        assert status == 403
    finally:
        _stop(proc)


def _other_address() -> str | None:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))  # no packet is sent: this only picks the outgoing interface
            addr = s.getsockname()[0]
        return None if addr.startswith("127.") else addr
    except OSError:
        return None


def test_auth_protects_the_page(tmp_path):
    proc, port, _ = _start_ui(tmp_path, "--auth", "me:secret")
    try:
        status, body = _wait(f"http://127.0.0.1:{port}/config", proc)
        assert status in (401, 403) or "auth_required" in body
        req = urllib.request.Request(f"http://127.0.0.1:{port}/login", data=b"username=me&password=wrong",
                                     method="POST")
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                assert r.status != 200
        except urllib.error.HTTPError as e:
            assert e.code in (400, 401, 403)
    finally:
        _stop(proc)


def test_port_argument(capsys):
    """The port flag comes from its FieldInfo (app/cli/serve.py): 1-65535, a one-line error naming --port."""
    from app.cli import build_parser, main
    for bad in ("0", "-1", "65536"):
        assert main(["ui", "--port", bad]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: --port") and "\n" not in err, err
    assert build_parser().parse_args(["ui", "--port", "65535"]).port == 65535

def test_launch_waits_for_a_busy_machine_to_answer_its_own_probe(monkeypatch):
    """gradio refuses to start when its 3 s probe of the just-started server goes unanswered (a busy machine);
    launch() lets the probe try again until the server answers."""
    import gradio as gr

    from app.ui.gradio_shims import patient_local_probe
    answers = iter([False, False, False, True])
    monkeypatch.setattr(gr.networking, "url_ok", lambda url: next(answers))
    with patient_local_probe():
        assert gr.networking.url_ok("http://127.0.0.1:1/") is True
    assert next(answers, "done") == "done"            # it asked until the answer came
    assert gr.networking.url_ok is not None and "patient" not in gr.networking.url_ok.__name__
