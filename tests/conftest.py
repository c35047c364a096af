"""Seeds every test; lists the devices to run on without touching a GPU at import."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import amid  # noqa: E402

# CUDA runs only where the CUDA kernels are built *and* a GPU is present; the check is made when a
# test is collected, without querying the device's properties.
HAS_CUDA = amid.cuda_kernels_available() and torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and amid's CUDA kernels")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
    yield
