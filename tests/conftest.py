import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from partial_fc.comm import SingleProcessCommunicator  # noqa: E402


@pytest.fixture
def single() -> SingleProcessCommunicator:
    return SingleProcessCommunicator()


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
