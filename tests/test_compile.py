"""torch.compile(fullgraph=True) traces the loss (through the fake kernels) forward and backward, and
gives the eager numbers; on CUDA also with CUDA graphs (mode='reduce-overhead')."""
import os
import subprocess
import sys

import pytest
import torch

import amid
from conftest import DEVICES, requires_cuda
from utils import make_logits


def _loss_fn(gif, **opts):
    def f(s, t, labels):
        # something before and after the op, so the op sits inside a larger graph (the extra term in
        # float32: eager rounds a bf16 mean to bf16, inductor does not, and only amid is compared here)
        return 0.5 * amid.amid_loss(s * 1.0, t, labels, grad_in_forward=gif, **opts) + 0.1 * s.float().pow(2).mean()
    return f


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("gif", [True, False])
@pytest.mark.parametrize("opts", [dict(alpha=0.5, lam=0.3, divergence="kl", order="pr"),
                                  dict(alpha=1.0, lam=0.6, divergence="kl", order="rq", detach_assistant=True),
                                  dict(alpha=-2.0, lam=0.1, divergence="ab", order="qr", temperature=2.0)])
def test_compile_fullgraph_forward_backward(device, gif, opts):
    torch._dynamo.reset()
    s, t = make_logits(6, 41, dtype=torch.float32, device=device)
    labels = torch.tensor([1, -100, 2, 3, 4, -100], device=device)
    f = _loss_fn(gif, **opts)
    cf = torch.compile(f, fullgraph=True)
    results = []
    for fn in (f, cf):
        x = s.clone().requires_grad_(True)
        out = fn(x, t, labels)
        out.backward()
        results.append((out.detach(), x.grad))
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(results[1][1], results[0][1], atol=1e-6, rtol=1e-5)


_CACHE_SCRIPT = r"""
import sys, torch, amid
from amid import _library, ops
if sys.argv[1] == "older":
    # What an older amid looked like to the cache: its fake kernel gave 7 stats per row (before 'jsd'),
    # and it had its own fingerprint (none at all before the fingerprint existed).
    ops.NUM_STATS = 7
    mine = _library.compile_cache_tag([ops.__file__])
    torch.compiler.config.cache_key_tag = torch.compiler.config.cache_key_tag.replace(mine, "amid-older")
s, t = torch.randn(6, 41), torch.randn(6, 41)
x = s.clone().requires_grad_(True)
f = lambda s, t: amid.amid_loss(s * 1.0, t, grad_in_forward=False, alpha=0.5, lam=0.3)
try:
    torch.compile(f, fullgraph=True)(x, t).backward()
    print("RAN", float(x.grad.abs().sum()))
except AssertionError as e:  # the size/stride check of a graph built for 7 stats
    print("SIZE-ASSERT", str(e).splitlines()[0])
"""


def test_compile_cache_keyed_on_amid(tmp_path):
    """A graph that inductor compiled and cached with another amid (other fake-kernel shapes) is not
    reused: amid puts its fingerprint in torch.compile's cache key (pytorch/pytorch#160472)."""
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path), TORCHINDUCTOR_FX_GRAPH_CACHE="1",
               TORCHINDUCTOR_AUTOGRAD_CACHE="1")
    env.pop("TORCH_COMPILE_CACHE_KEY_TAG", None)

    def run(who):
        out = subprocess.run([sys.executable, "-c", _CACHE_SCRIPT, who], env=env, capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        return out.stdout.strip().splitlines()[-1]

    older = run("older")
    assert older.startswith("SIZE-ASSERT"), older  # its graph was built for 7 stats; the kernel gives 8
    assert any(tmp_path.rglob("*.py")), "the older amid's graph did not reach the on-disk cache"
    assert run("current").startswith("RAN")


def test_compile_cache_tag_keeps_the_users():
    tag = torch.compiler.config.cache_key_tag
    mine = amid._library.compile_cache_tag([amid.ops.__file__])
    assert mine in tag.split(";")
    out = subprocess.run([sys.executable, "-c", "import amid, torch; print(torch.compiler.config.cache_key_tag)"],
                         env=dict(os.environ, TORCH_COMPILE_CACHE_KEY_TAG="users-tag"), capture_output=True,
                         text=True, timeout=300)
    assert out.stdout.split() == [f"users-tag;{mine}"], out.stderr[-2000:]


def test_compile_dynamic_shapes():
    torch._dynamo.reset()
    f = torch.compile(_loss_fn(True, alpha=0.5, lam=0.5), fullgraph=True, dynamic=True)
    for n in (3, 5, 8):
        s, t = make_logits(n, 23, dtype=torch.float32)
        labels = torch.arange(n)
        x = s.clone().requires_grad_(True)
        f(x, t, labels).backward()
        x2 = s.clone().requires_grad_(True)
        _loss_fn(True, alpha=0.5, lam=0.5)(x2, t, labels).backward()
        torch.testing.assert_close(x.grad, x2.grad, atol=1e-6, rtol=1e-5)


@requires_cuda
def test_cuda_graphs_reduce_overhead():
    """CUDA-graph capture replays on the current stream (the extension-cpp stream regression)."""
    torch._dynamo.reset()
    s, t = make_logits(64, 1000, dtype=torch.bfloat16, device="cuda")
    labels = torch.randint(0, 1000, (64,), device="cuda")
    labels[::7] = -100
    f = _loss_fn(True, alpha=0.5, lam=0.5)
    cf = torch.compile(f, mode="reduce-overhead")
    for _ in range(3):
        x = s.clone().requires_grad_(True)
        out = cf(x, t, labels)
        out.backward()
    x2 = s.clone().requires_grad_(True)
    ref = f(x2, t, labels)
    ref.backward()
    torch.testing.assert_close(out.detach(), ref.detach(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(x.grad.float(), x2.grad.float(), atol=1e-3, rtol=1e-2)
