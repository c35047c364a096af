"""torch.compile(fullgraph=True) traces the loss (through the fake kernels) forward and backward, and
gives the eager numbers; on CUDA also with CUDA graphs (mode='reduce-overhead')."""
import pytest
import torch

import amid
from conftest import DEVICES, requires_cuda
from utils import make_logits


def _loss_fn(gif, **opts):
    def f(s, t, labels):
        # something before and after the op, so the op sits inside a larger graph
        return 0.5 * amid.amid_loss(s * 1.0, t, labels, grad_in_forward=gif, **opts) + 0.1 * s.pow(2).mean()
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
