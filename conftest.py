"""Test-suite-wide (this file sits at the repository root, not in tests/: a conftest in tests/ would put
tests/ on sys.path, where the test folders named like our packages would shadow them): torch runs on
one intra-op thread.

The tests use tiny models; on two cores that other processes (the kill tests' subprocesses, the
machine's other jobs) also use, OpenMP's waiting between threads made them 10-100x slower than on
one thread.  A test that needs more threads sets them itself (``seg_helpers.torch_threads``).
"""
import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
