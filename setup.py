# setup.py -- pip build of the amid extension (amid._C), CPU kernels always, CUDA kernels when
# torch is a CUDA build and a CUDA toolkit is found.
#
# Contract shared with CMakeLists.txt (keep the two in step): both compile exactly the sources
# csrc/*.cpp + csrc/cpu/*.cpp (+ csrc/cuda/*.cu with CUDA), define AMID_WITH_CUDA when the CUDA
# sources are in, and honour TORCH_CUDA_ARCH_LIST (default here: 8.0;9.0a;10.0+PTX, i.e. sm_80 + sm_90a +
# sm_100 with compute_100 PTX for later GPUs; 8.0;9.0a with an nvcc older than 12.8).
#
# Environment knobs (printed at build time):
#   AMID_FORCE_CUDA=1    build the CUDA kernels or fail with the reason
#   AMID_DISABLE_CUDA=1  CPU kernels only, even with a CUDA toolkit
#   TORCH_CUDA_ARCH_LIST e.g. "9.0a" or "8.0;8.6;9.0a"
#   CUDA_HOME            the toolkit; found from nvcc on PATH when unset
#   MAX_JOBS, NVCC_THREADS, DEBUG=1 (-O0 -g / -G)
#   AMID_PTXAS_VERBOSE=1 registers, shared memory and spills of every kernel in the build log
#
# Install with `pip install --no-build-isolation .` so the build uses the torch already installed.
import glob
import os
import re
import shutil
import subprocess
import sys

import setuptools
from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))

# pyproject.toml's `license = "Apache-2.0"` (PEP 639) needs setuptools >= 77; an older one fails with
# "`project.license` must be valid exactly by one definition". With --no-build-isolation the installed
# setuptools is used, so say what to do.
if tuple(int(p) for p in re.findall(r"\d+", setuptools.__version__)[:1]) < (77,):
    sys.exit(f"[amid build] setuptools >= 77 is needed (found {setuptools.__version__}): "
             "pip install -U 'setuptools>=77', then build again")


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _log(msg: str) -> None:
    print(f"[amid build] {msg}", file=sys.stderr, flush=True)


def _find_cuda_home():
    """The CUDA toolkit folder: $CUDA_HOME / $CUDA_PATH, else the one the `nvcc` on PATH runs.

    `nvcc` may be a wrapper script (then its folder is not the toolkit), so ask nvcc itself: its
    dry run prints `TOP=<toolkit>/bin/..`.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        for cand in ("/usr/local/cuda",):
            if os.path.exists(os.path.join(cand, "bin", "nvcc")):
                return cand
        return None
    try:
        out = subprocess.run([nvcc, "--dryrun", "-E", "-x", "cu", os.devnull],
                             capture_output=True, text=True, timeout=60)
        for line in (out.stdout + out.stderr).splitlines():
            if "TOP=" in line:
                return os.path.realpath(line.split("TOP=", 1)[1].strip().strip('"'))
    except (OSError, subprocess.SubprocessError):
        pass
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


def _nvcc_version(home):
    """(major, minor) of the toolkit's nvcc; (0, 0) when it cannot be asked."""
    try:
        out = subprocess.run([os.path.join(home, "bin", "nvcc"), "--version"], capture_output=True, text=True,
                             timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return (0, 0)
    m = re.search(r"release (\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


FORCE_CUDA = _flag("AMID_FORCE_CUDA")
DISABLE_CUDA = _flag("AMID_DISABLE_CUDA")
DEBUG = _flag("DEBUG")

cuda_home = None if DISABLE_CUDA else _find_cuda_home()
if cuda_home:
    # torch.utils.cpp_extension reads CUDA_HOME when it is first imported.
    os.environ["CUDA_HOME"] = cuda_home

import torch  # noqa: E402
from torch.utils.cpp_extension import (  # noqa: E402
    BuildExtension, CppExtension, CUDAExtension)

if FORCE_CUDA and DISABLE_CUDA:
    raise RuntimeError("amid build: AMID_FORCE_CUDA=1 and AMID_DISABLE_CUDA=1 contradict each other")

if DISABLE_CUDA:
    use_cuda, why = False, "AMID_DISABLE_CUDA=1"
elif torch.version.cuda is None:
    use_cuda, why = False, f"torch {torch.__version__} is a CPU-only build"
elif cuda_home is None:
    use_cuda, why = False, "no CUDA toolkit found (no nvcc on PATH and CUDA_HOME unset)"
else:
    use_cuda, why = True, f"torch CUDA {torch.version.cuda}, toolkit {cuda_home}"

if FORCE_CUDA and not use_cuda:
    raise RuntimeError(
        f"amid build: AMID_FORCE_CUDA=1 but the CUDA kernels cannot be built: {why}. Install a "
        "CUDA build of torch and a CUDA toolkit (a 'devel' image, with nvcc) whose major version "
        "matches torch.version.cuda, or set CUDA_HOME to it.")

sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
if use_cuda:
    sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0a;10.0+PTX" if _nvcc_version(cuda_home) >= (12, 8) else "8.0;9.0a"
    arch_list = os.environ["TORCH_CUDA_ARCH_LIST"]
else:
    arch_list = ""


def _archs_macro(archs: str) -> str:
    out = []
    for a in archs.replace(" ", ";").split(";"):
        a = a.strip()
        if a:
            out.append("sm_" + a.replace("+PTX", "").replace(".", "") + ("+ptx" if "+PTX" in a else ""))
    return "/".join(out) or "none"  # '/' separates: nvcc splits -D values at commas


def _extra_cuda_includes():
    """Headers torch's CUDA headers need (cusparse.h, cublas_v2.h, ...) that a minimal toolkit may
    lack: the pip `nvidia-*` packages installed beside torch ship them."""
    if os.path.exists(os.path.join(cuda_home, "include", "cusparse.h")):
        return []
    dirs = []
    try:
        import nvidia  # namespace package of the pip CUDA libraries
        for base in list(nvidia.__path__):
            for inc in sorted(glob.glob(os.path.join(base, "*", "include"))):
                if os.path.exists(os.path.join(inc, "cusparse.h")) or os.path.exists(
                        os.path.join(inc, "cublas_v2.h")):
                    dirs.append(inc)
    except ImportError:
        pass
    return dirs


# (torch's BuildExtension adds -DPy_LIMITED_API itself for py_limited_api extensions.)
define_macros = [("AMID_TORCH_VERSION", torch.__version__)]
cxx_flags = ["-O0", "-g"] if DEBUG else ["-O3"]
# -fno-trapping-math lets the CPU kernel's branch-free selects vectorise and -fopenmp-simd enables its
# `#pragma omp simd reduction`s; no -ffast-math (inf / NaN keep their IEEE meaning).
cxx_flags += ["-fdiagnostics-color=always", "-fno-trapping-math", "-fopenmp-simd"]
ext_kwargs = dict(name="amid._C", sources=sources, py_limited_api=True)

if use_cuda:
    define_macros += [("AMID_WITH_CUDA", None), ("AMID_CUDA_ARCHS", _archs_macro(arch_list))]
    nvcc_flags = ["-O0", "-g", "-G"] if DEBUG else ["-O3", "-lineinfo"]
    nvcc_flags += ["--expt-relaxed-constexpr"]
    if _flag("AMID_PTXAS_VERBOSE"):
        nvcc_flags += ["-Xptxas", "-v"]
    if os.environ.get("NVCC_THREADS"):
        nvcc_flags += ["--threads", os.environ["NVCC_THREADS"]]
    include_dirs = _extra_cuda_includes()
    ext = CUDAExtension(define_macros=define_macros, include_dirs=include_dirs,
                        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags}, **ext_kwargs)
else:
    ext = CppExtension(define_macros=define_macros, extra_compile_args={"cxx": cxx_flags}, **ext_kwargs)

_log(f"torch {torch.__version__}; CUDA kernels: {'yes' if use_cuda else 'no'} ({why})")
if use_cuda:
    _log(f"TORCH_CUDA_ARCH_LIST={arch_list}; MAX_JOBS={os.environ.get('MAX_JOBS', '(default)')}")
_log(f"sources: {' '.join(sources)}")

setup(
    packages=find_packages(include=["amid", "amid.*"]),
    package_data={"amid": ["py.typed", "data/*.jsonl"]},
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
