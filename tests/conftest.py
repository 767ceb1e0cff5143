import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "workflow"))

SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture
def shared_slides():
    """Real third-party slides from ../shared/data/slides (never copied into the repository)."""
    folder = SHARED_DATA / "slides"
    if not folder.is_dir():
        pytest.skip(f"third-party test slides not found at {folder}")
    return folder
