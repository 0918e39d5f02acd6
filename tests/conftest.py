"""Fixtures for every test directory; plain helpers (configs, random models, ``rel_err``) are in ``helpers.py``."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """One intra-op thread for the whole run, session fixtures included (restored at the end): the models are tiny,
    so one thread is faster on a shared machine, and sums do not depend on the core count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
