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


def pytest_collection_modifyitems(config, items):
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "cuda" in item.keywords:
                item.add_marker(skip)
