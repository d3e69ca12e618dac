import pytest
import torch

# The suite runs on 2 cores; more threads than cores only adds contention.
torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
