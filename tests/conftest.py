"""Shared fixtures: the real data beside the checkout, and the repository root importable here and in the
processes the tests start (scripts, launchers), whether or not the project is pip-installed."""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
if not os.environ.get("CUDA_VISIBLE_DEVICES") and not Path("/dev/nvidia0").exists():
    # DeepSpeed's CPU accelerator, named rather than detected, so its warning is not printed by every process.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

from common import SHARED_DATA_ENV, free_port, shared_data_dir  # noqa: E402,F401 - free_port for the tests

SHARED = shared_data_dir()
FIXTURES = ROOT / "tests" / "fixtures"


_running = {}


@pytest.fixture(autouse=True)
def _remember_running_test(request):
    _running["test"] = request.node
    yield
    _running.pop("test", None)


def shared_path(*parts) -> Path:
    """A path under the real data folder, or skip the test with the reason when it is absent. Only tests marked
    real_data may skip this way (each has a twin on the fixtures); an unmarked test that needs the real files
    fails here, so a fresh clone's run skips nothing but real-data and GPU tests."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        test = _running.get("test")
        if test is not None and test.get_closest_marker("real_data") is None:
            pytest.fail(f"{test.nodeid} reads {path} but is not marked real_data (give it a fixture twin)")
        pytest.skip(f"real data not found at {path} (set {SHARED_DATA_ENV}; ../shared/data is laid beside the "
                    "checkout in CI)")
    return path


@pytest.fixture
def released_tokenizer() -> Path:
    return shared_path("baichuan-7b-tokenizer", "tokenizer.model")


def pytest_configure(config):
    config.addinivalue_line("markers", "real_data: needs the real benchmark or corpus files (skips without them)")


@pytest.fixture(scope="module", params=["fixtures", pytest.param("real", marks=pytest.mark.real_data)])
def bench(request) -> Path:
    """Folder holding the five benchmarks in their official layouts: the project's own fixtures
    (tests/fixtures/benchmarks, written by make_benchmarks.py), and the real files where they are present."""
    return FIXTURES / "benchmarks" if request.param == "fixtures" else shared_path()


@pytest.fixture(scope="module", params=["repo", pytest.param("released", marks=pytest.mark.real_data)])
def any_tokenizer(request) -> Path:
    """A 64000-piece tokenizer with the released conventions: this repository's, and the released one."""
    return ROOT / "tokenizer.model" if request.param == "repo" else shared_path("baichuan-7b-tokenizer",
                                                                                  "tokenizer.model")
