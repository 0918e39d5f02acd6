"""Fixtures for every test directory; plain helpers (configs, random models, ``rel_err``) are in ``helpers.py``."""

import os

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """One intra-op thread for the whole run, session fixtures included (restored at the end): the models are tiny,
    so one thread is faster on a shared machine, and sums do not depend on the core count. ``NIJIMI_THREADS=1`` keeps
    the CLI's own default (the physical cores) from changing that when a test calls ``nijimi.cli.main``."""
    before, env = torch.get_num_threads(), os.environ.get("NIJIMI_THREADS")
    torch.set_num_threads(1)
    os.environ["NIJIMI_THREADS"] = "1"
    yield
    torch.set_num_threads(before)
    if env is None:
        os.environ.pop("NIJIMI_THREADS")
    else:
        os.environ["NIJIMI_THREADS"] = env


@pytest.fixture(autouse=True, scope="session")
def private_cache(tmp_path_factory):
    """Model hashes are cached in a folder of this run (``NIJIMI_CACHE_DIR``), not in the user's ``~/.cache``."""
    before = os.environ.get("NIJIMI_CACHE_DIR")
    os.environ["NIJIMI_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if before is None:
        os.environ.pop("NIJIMI_CACHE_DIR")
    else:
        os.environ["NIJIMI_CACHE_DIR"] = before
