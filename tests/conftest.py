from __future__ import annotations

import os
from pathlib import Path

import pytest

# the memory budget's default is half of the machine's memory; the tests fix it, so that messages
# naming it (and what is refused) are the same on every machine
os.environ["TPC_MEMORY_GB"] = "8"

ROOT = Path(__file__).resolve().parent.parent
PROGRAMS = ROOT / "programs"


@pytest.fixture
def root() -> Path:
    return ROOT
