import pytest
import torch

# Tests do small tensor work: one intra-op thread avoids OpenMP spin-waiting, which dominates
# tiny ops (and is pathological when other processes share the cores).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
