"""Shared fixtures: offline environment, tiny models saved like real ones, drawn image folders."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ["LORASTUDIO_NO_BAR"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One compute thread per test process (and the trainers and servers it starts, which inherit this): CI runs two
# pytest workers on two cores, and two 2-thread torch processes on two cores spin against each other (OpenMP's
# busy wait), which made the slow tests 1.3-4x slower than alone. The tiny models gain nothing from a second
# thread. A test that measures threading sets its own.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def _isolated_home(tmp_path_factory):
    """User presets and caches go to a temporary home, never the real one."""
    home = tmp_path_factory.mktemp("lorastudio_home")
    os.environ["LORASTUDIO_HOME"] = str(home)
    yield home


def _tiny_dir(tmp_path_factory, family: str) -> Path:
    from tests.fixtures.tiny_models import save_tiny_pipeline
    return save_tiny_pipeline(tmp_path_factory.mktemp(f"tiny_{family}") / "model", family)


@pytest.fixture(scope="session")
def tiny_sd1_dir(tmp_path_factory) -> Path:
    return _tiny_dir(tmp_path_factory, "sd1")


@pytest.fixture(scope="session")
def tiny_sd2_dir(tmp_path_factory) -> Path:
    return _tiny_dir(tmp_path_factory, "sd2")


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory) -> Path:
    return _tiny_dir(tmp_path_factory, "sdxl")


from tests.fixtures.images import make_image_folder  # noqa: E402


@pytest.fixture
def image_folder(tmp_path) -> Path:
    return make_image_folder(tmp_path / "images")


@pytest.fixture
def messy_folder(tmp_path) -> Path:
    return make_image_folder(tmp_path / "messy", n=4, broken=True)
