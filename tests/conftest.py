"""Fixtures shared by the test modules."""
import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny tensors: one thread is as fast, and far faster on a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def fast_setup_isolated(monkeypatch, tmp_path_factory):
    """du.fast_setup remembers its choice per device and caches it in the user's folder: keep
    each test's choice to itself and the cache out of the user's home."""
    import diffusion_utilities as du
    monkeypatch.setattr(du, "_FAST_ON_DEVICE", {})
    monkeypatch.setattr(du, "_FAST_MEASURED", {})
    monkeypatch.setattr(du, "FAST_SETUP_CACHE", tmp_path_factory.getbasetemp() / "fast_setup.json")
