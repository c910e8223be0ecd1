import os

import pytest
import torch

# Tests use tiny tensors: one thread is faster for them and immune to a busy machine's oversubscription.
torch.set_num_threads(1)


def gpu_test_device() -> str | None:
    """Where the ``gpu``-marked tests run: ``$EDMKIT_TEST_DEVICE`` if set (``cpu`` checks the tests themselves on a
    machine without CUDA), else ``cuda`` when available, else nowhere (they are skipped)."""
    return os.environ.get("EDMKIT_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else None)


@pytest.fixture
def gpu_device() -> torch.device:
    return torch.device(gpu_test_device() or "cuda")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs CUDA (or EDMKIT_TEST_DEVICE)")
    for item in items:
        if "gpu" in item.keywords and gpu_test_device() is None:
            item.add_marker(skip_gpu)
