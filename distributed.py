"""
Data parallelism for train.py under torchrun (env:// init; NCCL on GPU, gloo on CPU): set-up, bucketed all-reduce of
gradients and broadcast of weights, barriers. Every function is a no-op for one process.
"""
import datetime
import os

import torch
import torch.distributed as dist

from cli import pick_device

def dist_setup(device_arg, timeout_min=120):
    """torchrun env:// init with a `timeout_min` collective timeout (rank 0 alone saves/samples meanwhile)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank, local = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    device = pick_device(device_arg)
    cuda = device.type == "cuda"
    if cuda:
        device = torch.device(f"cuda:{local}") if device.index is None else device    # torchrun: one GPU per rank
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=timeout_min))
    return rank, world, device


def _buckets(tensors, bucket):
    """Consecutive groups of same-dtype tensors of up to `bucket` elements."""
    group = []
    for t in list(tensors) + [None]:
        if group and (t is None or t.dtype != group[0].dtype or sum(x.numel() for x in group) >= bucket):
            yield group
            group = []
        if t is not None:
            group.append(t)


def _collective_(tensors, fn, bucket, device=None):
    """fn on flat buckets of the tensors, moved to `device` for it (NCCL: host tensors, e.g. a host EMA)."""
    for group in _buckets(tensors, bucket):
        flat = torch.cat([x.reshape(-1) for x in group]).to(device or group[0].device)
        fn(flat)
        o = 0
        for x in group:
            x.copy_(flat[o:o + x.numel()].view_as(x))
            o += x.numel()


def all_reduce_mean(tensors, world, bucket=1 << 26):
    """Average tensors across ranks in place, in flat buckets of up to `bucket` elements."""
    if world > 1:
        _collective_(tensors, lambda flat: (dist.all_reduce(flat), flat.div_(world)), bucket)


def broadcast_from_rank0(tensors, world, bucket=1 << 26, device=None):
    """Overwrite tensors in place with rank 0's, in flat buckets (sent from `device`)."""
    if world > 1:
        _collective_(tensors, lambda flat: dist.broadcast(flat, src=0), bucket, device)


def barrier(world):
    if world > 1:
        dist.barrier()
