"""An installed wheel finds its templates, MQL5 includes and default config without the repository."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    completed = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(out), str(REPO_ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if completed.returncode != 0 and "No module named 'hatchling'" in completed.stderr + completed.stdout:
        completed = subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(out), str(REPO_ROOT)], capture_output=True, text=True, timeout=600
        )
    assert completed.returncode == 0, completed.stderr[-2000:]
    return next(out.glob("fxbundle-*.whl"))


def test_wheel_carries_data_files(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in (
        "fxbundle/_data/templates/expert.mq5.j2",
        "fxbundle/_data/templates/model_spec.mqh.j2",
        "fxbundle/_data/mql5/FxBundle/ExampleFeatures.mqh",
        "fxbundle/_data/config/onnx_conversion.yaml",
        "fxbundle/_data/config/pairs.yaml",
        "fxbundle/_data/config/targets/mt5.yaml",
        "fxbundle/locales/en/core.yaml",
        "fxbundle/locales/ja/core.yaml",
    ):
        assert required in names, required


def test_unpacked_wheel_resolves_builtin_dirs(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = (
        "from fxbundle import resources, config;"
        "print(resources.builtin_dir('templates'));"
        "print(config.load_pair('USDJPY').pips_multiplier)"
    )
    completed = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 0, completed.stderr
    templates, multiplier = completed.stdout.split()
    assert Path(templates) == site / "fxbundle" / "_data" / "templates"
    assert float(multiplier) == 100.0
