"""Vocab-parallel AMiD under torchrun (CPU, gloo): each rank holds a slice of the vocabulary.

    torchrun --nproc-per-node 2 examples/vocab_parallel_demo.py

Every rank builds the same random logits, keeps its [N, V/P] slice, and computes the loss with
amid.parallel.vocab_parallel_amid_loss (and with DTensor logits through amid.amid_loss); rank 0
prints both next to the single-process amid.amid_loss and the largest gradient difference.
"""
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's amid
import amid  # noqa: E402
from amid.parallel import vocab_parallel_amid_loss  # noqa: E402


def main():
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    N, V = 8, 1001  # V not divisible by the number of ranks: uneven shards are fine
    g = torch.Generator().manual_seed(0)
    student = torch.randn(N, V, generator=g, dtype=torch.float64) * 3
    teacher = torch.randn(N, V, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(0, V, (N,), generator=g)
    labels[2] = -100  # an ignored row
    opts = dict(alpha=0.5, lam=0.1, divergence="ab", order="pr")

    cuts = [V * r // world for r in range(world + 1)]
    lo, hi = cuts[rank], cuts[rank + 1]
    shard = student[:, lo:hi].clone().requires_grad_(True)
    loss = vocab_parallel_amid_loss(shard, teacher[:, lo:hi], labels, **opts)  # same value on every rank
    loss.backward()  # shard.grad: this rank's columns of the gradient

    full = student.clone().requires_grad_(True)
    ref = amid.amid_loss(full, teacher, labels, **opts)
    ref.backward()
    err = (shard.grad - full.grad[:, lo:hi]).abs().max()
    dist.all_reduce(err, op=dist.ReduceOp.MAX)

    # The same through DTensor: logits sharded on the last dimension over a 1-D mesh.
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    loss_dt = amid.amid_loss(distribute_tensor(student, mesh, [Shard(-1)]),
                             distribute_tensor(teacher, mesh, [Shard(-1)]), labels, **opts)
    if rank == 0:
        print(f"{world} ranks, V = {V} split {[b - a for a, b in zip(cuts, cuts[1:])]}")
        print(f"vocab-parallel loss {loss.item():.15f}")
        print(f"DTensor loss        {loss_dt.item():.15f}")
        print(f"single-process loss {ref.item():.15f}")
        print(f"max gradient difference over all shards {err.item():.2e}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
