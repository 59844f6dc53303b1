"""One home for each piece of code: importable modules without sys.path tricks, entry points that explain
themselves, and the small newcomer fixes (plot smoothing)."""
import re
import subprocess
import sys
import tomllib

import pytest

from conftest import ROOT


def tracked_python_files():
    out = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [ROOT / line for line in out.splitlines() if line]


def test_no_sys_path_insert_outside_the_test_conftest():
    offenders = [str(p.relative_to(ROOT)) for p in tracked_python_files()
                 if "sys.path.insert" in p.read_text(encoding="utf-8") and p != ROOT / "tests" / "conftest.py"
                 and p != ROOT / "tests" / "test_layout.py"]
    assert offenders == []


def test_pyproject_installs_every_top_level_module_and_package():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    modules = {p.stem for p in ROOT.glob("*.py")}
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")}
    assert set(config["py-modules"]) == modules
    assert set(config["packages"]) == packages


@pytest.mark.parametrize("module", ["train", "corpus.pipeline", "evaluation.evaluate_zh"])
def test_help_shows_defaults(module):
    proc = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "(default:" in proc.stdout


def test_moving_average_uses_full_windows_and_refuses_a_window_longer_than_the_run():
    from scripts.plot_loss import moving_average

    assert moving_average([1.0, 2.0, 3.0, 4.0], 2) == [1.5, 2.5, 3.5]
    assert moving_average([1.0, 2.0, 3.0], 3) == [2.0]
    with pytest.raises(ValueError, match=re.escape("--smooth 5 is larger than the 3 logged point(s)")):
        moving_average([1.0, 2.0, 3.0], 5)
