import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _shared import shared_dir, shared_path  # noqa: E402


@pytest.fixture(scope="session")
def shared():
    """Root of the shared reference data (`../shared` or `$SEMTRACK_SHARED`)."""
    return shared_dir()


@pytest.fixture(scope="session")
def videos_dir():
    return shared_path("videos")


@pytest.fixture(scope="module")
def one_thread():
    """One torch and one BLAS / OpenMP thread for a module of small tensors and scikit-learn fits:
    faster than two contending threads on a busy 2-core runner (use with `pytest.mark.usefixtures`)."""
    import torch
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(before)


def pytest_collection_modifyitems(config, items):
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "cuda" in item.keywords:
                item.add_marker(skip)
