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
