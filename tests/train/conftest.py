import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import train_helpers  # noqa: E402  (tests/train is on sys.path: pytest's rootdir-less import mode)


@pytest.fixture(scope="module")
def tiny():
    """The test-only model, registered for these tests and removed from the registry after them.

    The tests train on one thread: on a 2-core machine shared with other jobs, two OpenMP threads
    that wait for each other make these small steps many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    train_helpers.register()
    yield train_helpers.NAME
    train_helpers.unregister()
    torch.set_num_threads(threads)
