"""Loads the native library (amid/_C*.so, or $AMID_LIBRARY) and reports how it was built."""
from __future__ import annotations

import glob
import hashlib
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


def compile_cache_tag(fake_sources) -> str:
    """amid's fingerprint for torch.compile's caches: the version, every ``amid::`` schema and the
    source of the fake kernels (``fake_sources``: file paths)."""
    from . import __version__

    h = hashlib.sha256(__version__.encode())
    for name in sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("amid::")):
        for schema in torch._C._jit_get_schemas_for_operator(name):
            h.update(str(schema).encode())
    for path in fake_sources:
        with open(path, "rb") as f:
            h.update(f.read())
    return "amid-" + h.hexdigest()[:16]


def tag_compile_caches(fake_sources) -> None:
    """Add amid's fingerprint to ``torch.compiler.config.cache_key_tag`` (keeping the user's tag).

    Inductor's FX-graph and AOTAutograd caches key a graph on its code, which names a custom op but
    not the output shapes its fake kernel gave (pytorch/pytorch#160472). Without the tag, a graph
    compiled with another amid (e.g. 7 stats per row instead of 8) is loaded from the on-disk cache
    and fails its size assertion at run time."""
    tag = compile_cache_tag(fake_sources)
    current = torch.compiler.config.cache_key_tag
    if tag not in current.split(";"):
        torch.compiler.config.cache_key_tag = f"{current};{tag}" if current else tag


def has_kernel(device_type: str) -> bool:
    """Whether the loaded library has AMiD kernels for this device type ('cpu', 'cuda', ...)."""
    return _kernels.get(device_type, False)


def cuda_kernels_available() -> bool:
    """True when amid was built with its CUDA kernels (whether or not a GPU is present)."""
    return has_kernel("cuda")


def build_info() -> dict:
    """What the loaded library was built with: version, torch, CUDA kernels and archs, the clone of the
    CPU loops this process runs (x86-64-v4 / x86-64-v3 / baseline), path."""
    from . import __version__

    fields = dict(kv.split("=", 1) for kv in torch.ops.amid._build_info().split(";") if "=" in kv)
    archs = [a for a in fields.get("cuda_archs", "").split("/") if a and a != "none"]
    return {
        "version": __version__,
        "torch_built_against": fields.get("torch", "unknown"),
        "torch_runtime": torch.__version__,
        "cuda_kernels": fields.get("cuda") == "1",
        "cuda_archs": archs,
        "cpu_isa": fields.get("cpu_isa", "unknown"),
        "cpu_isa_forced": fields.get("cpu_isa_forced") == "1",  # a -DAMID_CPU_TARGET benchmarking build
        "gpu_available": torch.cuda.is_available(),
        "library": _loaded_path,
    }
