"""Shared fixtures: the real data beside the checkout, and the repository root on sys.path."""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("BAICHUAN_SHARED_DATA", ROOT.parent / "shared" / "data"))
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def shared_path(*parts) -> Path:
    """A path under ../shared/data, or skip the test with the reason when it is absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not found at {path} (../shared/data is laid beside the checkout in CI)")
    return path


@pytest.fixture
def released_tokenizer() -> Path:
    return shared_path("baichuan-7b-tokenizer", "tokenizer.model")


@pytest.fixture(scope="session", autouse=True)
def leave_dev_shm_as_found():
    """Remove DeepSpeed's shared-memory all-reduce buffers that appeared in /dev/shm during the session: a
    launcher test that kills its ranks leaves them behind (69 MB of RAM each). Buffers that other programs on
    the machine hold when the session starts are left alone."""
    shm = Path("/dev/shm")
    pattern = f"deepspeed_allreduce_buffer_{os.getuid()}_*"
    before = set(shm.glob(pattern)) if shm.is_dir() else set()
    yield
    if shm.is_dir():
        for path in set(shm.glob(pattern)) - before:
            path.unlink(missing_ok=True)
