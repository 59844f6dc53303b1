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

from common import SHARED_DATA_ENV, free_port, shared_data_dir  # noqa: E402,F401 - free_port for the tests

SHARED = shared_data_dir()


def shared_path(*parts) -> Path:
    """A path under the real data folder, or skip the test with the reason when it is absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not found at {path} (set {SHARED_DATA_ENV}; ../shared/data is laid beside the "
                    "checkout in CI)")
    return path


@pytest.fixture
def released_tokenizer() -> Path:
    return shared_path("baichuan-7b-tokenizer", "tokenizer.model")
