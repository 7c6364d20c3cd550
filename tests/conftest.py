"""Shared test configuration: CUDA-marked tests skip on machines without a GPU."""

from __future__ import annotations

import pytest
import torch
from hypothesis import settings

settings.register_profile("ci", deadline=None, max_examples=25, derandomize=True)
settings.load_profile("ci")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip_cuda)


def pytest_configure(config: pytest.Config) -> None:
    # Small test tensors gain nothing from intra-op threads, and on a loaded 2-core machine two threads
    # contend badly (a 64x64 linear layer ran 400x slower in a measurement): one thread keeps tests fast.
    torch.set_num_threads(1)
