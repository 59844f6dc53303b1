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


def _mapped_shm_files() -> set:
    """Paths under /dev/shm that a living process has mapped."""
    mapped = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            text = maps.read_text()
        except OSError:  # the process ended meanwhile
            continue
        mapped.update(line.split(maxsplit=5)[-1] for line in text.splitlines() if " /dev/shm/" in line)
    return mapped


@pytest.fixture(scope="session", autouse=True)
def leave_dev_shm_as_found():
    """Remove DeepSpeed's shared-memory all-reduce buffers that appeared in /dev/shm during the session and that no
    living process maps: a launcher test that kills its ranks leaves them behind (69 MB of RAM each). Buffers
    present at the start, or in use by a run elsewhere on the machine, are left alone."""
    shm = Path("/dev/shm")
    pattern = f"deepspeed_allreduce_buffer_{os.getuid()}_*"
    before = set(shm.glob(pattern)) if shm.is_dir() else set()
    yield
    if shm.is_dir():
        new = set(shm.glob(pattern)) - before
        in_use = _mapped_shm_files() if new else set()
        for path in new:
            if str(path) not in in_use:
                path.unlink(missing_ok=True)
