import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Small CPU steps on a shared 2-core machine run fastest (and steadiest) on one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    d = tmp_path / "lra-cache"
    monkeypatch.setenv("FORMERS_LRA_CACHE", str(d))
    return d
