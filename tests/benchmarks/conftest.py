"""Shared by the benchmark tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny ops on a busy machine: a second OpenMP thread mostly waits for a core, slowing these tests several-fold.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
