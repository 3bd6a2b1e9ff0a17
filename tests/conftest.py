import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from partial_fc.comm import SingleProcessCommunicator  # noqa: E402
from tests.train_runs import make_faceset  # noqa: E402


@pytest.fixture
def single() -> SingleProcessCommunicator:
    return SingleProcessCommunicator()


@pytest.fixture(scope="module")
def faceset(tmp_path_factory) -> Path:
    """The tiny generated face set `tests/train_runs.py` trains on, one per test module."""
    return make_faceset(tmp_path_factory.mktemp("faces"))


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
