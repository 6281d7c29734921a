"""Shared test setup: deterministic, small-thread CPU runs."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_threads():
    # 2-core machine: 2 intra-op threads; every test starts from the same seed
    torch.set_num_threads(2)
    torch.manual_seed(0)
    yield
