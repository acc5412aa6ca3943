from __future__ import annotations

import os
from pathlib import Path

import pytest

# the memory budget's default is half of the machine's memory; the tests fix it, so that messages
# naming it (and what is refused) are the same on every machine
os.environ["TPC_MEMORY_GB"] = "8"

# one process per core (pytest-xdist, pyproject.toml's addopts): each takes one thread, where torch's
# default of one per core would make two processes fight over every core (a fifth slower on two)
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parent.parent
PROGRAMS = ROOT / "programs"


@pytest.fixture
def root() -> Path:
    return ROOT
