"""Test set-up shared by the whole suite.

Without a GPU, compiled flex_attention runs our real Triton kernels in
Triton's interpreter on CPU tensors (FLEX_INDUCTOR_INTERPRET=1, set here
before flex_inductor is imported). With a GPU, the same tests run on CUDA.
Cases marked ``slow`` run only with FLEX_INDUCTOR_SLOW=1.
"""

from __future__ import annotations

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("FLEX_INDUCTOR_INTERPRET", "1")

import flex_inductor  # noqa: E402,F401  (after the environment is set)

DEVICE = "cuda" if HAS_CUDA else "cpu"


def pytest_collection_modifyitems(config, items):
    if os.environ.get("FLEX_INDUCTOR_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: set FLEX_INDUCTOR_SLOW=1 to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device() -> str:
    """The device compiled kernels run on: cuda, or cpu under the interpreter."""
    return DEVICE
