"""Loads the native library (amid/_C*.so, or $AMID_LIBRARY) and reports how it was built."""
from __future__ import annotations

import glob
import os
from typing import Optional

import torch

_loaded_path: Optional[str] = None
# Device types with AMiD kernels in the loaded library; filled once by load() (a dispatcher query,
# no device is touched) so that torch.compile sees a constant.
_kernels: dict = {}


def load() -> str:
    """Load the library that registers ``torch.ops.amid.*`` (once) and return its path."""
    global _loaded_path
    if _loaded_path is not None:
        return _loaded_path
    path = os.environ.get("AMID_LIBRARY")
    if not path:
        here = os.path.dirname(os.path.abspath(__file__))
        candidates = sorted(glob.glob(os.path.join(here, "_C*.so")) + glob.glob(os.path.join(here, "_C*.pyd")))
        if not candidates:
            raise ImportError(
                "amid: the native library amid/_C*.so was not found. Build it with "
                "`pip install --no-build-isolation .` (or `-e .`), or set AMID_LIBRARY to a "
                "libamid.so built with CMake.")
        path = candidates[0]
    torch.ops.load_library(path)
    _loaded_path = path
    for device_type, key in (("cpu", "CPU"), ("cuda", "CUDA")):
        _kernels[device_type] = torch._C._dispatch_has_kernel_for_dispatch_key("amid::amid_loss_fwd", key)
    return path


def has_kernel(device_type: str) -> bool:
    """Whether the loaded library has AMiD kernels for this device type ('cpu', 'cuda', ...)."""
    return _kernels.get(device_type, False)


def cuda_kernels_available() -> bool:
    """True when amid was built with its CUDA kernels (whether or not a GPU is present)."""
    return has_kernel("cuda")


def build_info() -> dict:
    """What the loaded library was built with: version, torch, CUDA kernels and archs, path."""
    from . import __version__

    fields = dict(kv.split("=", 1) for kv in torch.ops.amid._build_info().split(";") if "=" in kv)
    archs = [a for a in fields.get("cuda_archs", "").split("/") if a and a != "none"]
    return {
        "version": __version__,
        "torch_built_against": fields.get("torch", "unknown"),
        "torch_runtime": torch.__version__,
        "cuda_kernels": fields.get("cuda") == "1",
        "cuda_archs": archs,
        "gpu_available": torch.cuda.is_available(),
        "library": _loaded_path,
    }
