"""The registered ops: schemas equal the golden file, and torch.library.opcheck passes on every op
(schema, autograd registration, fake tensor, AOT dispatch) on each device."""
import os

import pytest
import torch
from torch.library import opcheck

import amid
from conftest import DEVICES
from utils import make_logits

GOLDEN = os.path.join(os.path.dirname(__file__), "op_schemas.txt")
OPS = ["amid_loss_fwd", "amid_loss_bwd", "scale_grad_", "_build_info", "amid_loss_topk_fwd", "amid_loss_topk_bwd",
       "amid_partial_lse", "amid_partial_mix", "amid_partial_sums"]


def test_schemas_match_golden_file():
    with open(GOLDEN) as f:
        golden = sorted(line.strip() for line in f if line.strip())
    registered = sorted(str(getattr(torch.ops.amid, name).default._schema) for name in OPS)
    assert registered == golden


def test_kernels_registered():
    for name in ("amid_loss_fwd", "amid_loss_bwd", "scale_grad_", "amid_partial_lse", "amid_partial_mix", "amid_partial_sums"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"amid::{name}", "CPU")
    info = amid.build_info()
    assert info["version"] == amid.__version__ and info["library"].endswith(".so")
    assert info["cuda_kernels"] == amid.cuda_kernels_available()
    assert info["cpu_isa"] in ("x86-64-v4", "x86-64-v3", "baseline")


def test_cpu_isa_is_the_cpus_level():
    """build_info names the clone of the CPU loops the loader picked: the highest x86-64 level the CPU
    has (v4: AVX-512 F/BW/CD/DQ/VL; v3: AVX2, FMA, BMI1/2, F16C, MOVBE...)."""
    import platform
    if platform.machine() != "x86_64" or not os.path.exists("/proc/cpuinfo"):
        pytest.skip("x86-64 Linux only")
    if amid.build_info()["cpu_isa_forced"]:
        pytest.skip("a -DAMID_CPU_TARGET build runs one level by design")
    flags = set()
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    v3 = {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"} <= flags
    v4 = v3 and {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"} <= flags
    assert amid.build_info()["cpu_isa"] == ("x86-64-v4" if v4 else "x86-64-v3" if v3 else "baseline")


def _fwd_samples(device):
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        s, t = make_logits(5, 37, dtype=dtype, device=device)
        ldt = torch.float64 if dtype == torch.float64 else torch.float32
        w = torch.tensor([1.0, 0.0, 0.5, 2.0, 1.0], dtype=ldt, device=device)
        for requires_grad in (True, False):
            for compute_grad in (True, False):
                for row_weight, opts in ((None, (0.5, 0.3, "kl", "pr", 0.2, 0.7, 1.0, False)),
                                         (w, (-1.0, 0.7, "ab", "rq", 0.3, 0.6, 2.0, True))):
                    x = s.clone().requires_grad_(requires_grad)
                    yield (x, t, row_weight) + opts + (compute_grad,)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_amid_loss_fwd(device):
    for args in _fwd_samples(device):
        opcheck(torch.ops.amid.amid_loss_fwd.default, args)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_amid_loss_bwd(device):
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        s, t = make_logits(4, 19, dtype=dtype, device=device)
        opts = (0.5, 0.4, "kl", "qr", 0.2, 0.7, 1.0, False)
        _loss, stats, _ = torch.ops.amid.amid_loss_fwd(s, t, None, *opts, False)
        gl = torch.randn(4, dtype=stats.dtype, device=device)
        opcheck(torch.ops.amid.amid_loss_bwd.default, (gl, s, t, None, stats) + opts)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_scale_grad_(device):
    for dtype in (torch.float32, torch.float64, torch.float16):
        g = torch.randn(4, 9, dtype=dtype, device=device)
        gl = torch.tensor([1.0, 0.5, -2.0, 1.0], dtype=torch.float64 if dtype == torch.float64 else torch.float32,
                          device=device)
        opcheck(torch.ops.amid.scale_grad_.default, (g, gl))
