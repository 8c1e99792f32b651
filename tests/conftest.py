import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def golden_path() -> Path:
    shared = Path(os.environ.get("TARFLOW_SHARED", REPO.parent / "shared"))
    return shared / "golden" / "golden_tarflow.pt"


@pytest.fixture(scope="session")
def golden():
    path = golden_path()
    if not path.exists():
        pytest.fail(f"golden file not found at {path}; set TARFLOW_SHARED to the folder holding golden/")
    return torch.load(path, weights_only=True)


@pytest.fixture(autouse=True)
def _deterministic_threads():
    # The golden data were made with 1 thread; more threads move sampling outputs by ~1e-6.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
