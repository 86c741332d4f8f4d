"""Small DDP helpers: init from the torchrun environment, gathers and reductions, rank 0.

A plain ``python -m tokenizer_train train`` is world size 1 and every helper is then a
no-op on local data, so the loop has a single code path.
"""
from __future__ import annotations

import inspect
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from motion_data.common.errors import SettingError


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(pref: str, local_rank: int = 0) -> torch.device:
    if pref == "cuda" or (pref == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise SettingError("training.device is cuda but no CUDA device is available; use training.device=cpu or auto")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init(device_pref: str = "auto") -> Dist:
    """Join the process group that torchrun describes (WORLD_SIZE > 1), else a single process.

    Backend: nccl on CUDA, gloo on CPU.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_pref, local_rank)
    if world <= 1:
        return Dist(device=device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    global _cpu_group
    # host-side agreements (a stop request) without a CUDA sync: gloo beside nccl
    _cpu_group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else None
    return Dist(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, device=device)


def cleanup():
    global _cpu_group
    _cpu_group = None
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


_cpu_group = None  # gloo group for agree_max under nccl (None: the default group is gloo)


def _ready() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def wrap_ddp(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``model`` in DistributedDataParallel, buffers not broadcast on every forward (the
    model's buffers are constants, identical on every rank)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [device.index] if device.type == "cuda" else None
    # torch 2.13 deprecated broadcast_buffers (a FutureWarning) for forward_sync_buffers
    if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters:
        return DDP(model, device_ids=ids, forward_sync_buffers=False)
    return DDP(model, device_ids=ids, broadcast_buffers=False)


def agree_max(value: int) -> int:
    """The largest of every rank's ``value`` (a host integer; every rank must call it at the
    same point), without touching the CUDA stream; ``value`` itself in a single process."""
    if not _ready():
        return int(value)
    t = torch.tensor([int(value)], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_cpu_group)
    return int(t.item())


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)  # d(sum over ranks)/dx_r: every rank's gradient of the sum
        return grad


def all_reduce_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Sum of ``x`` over ranks that passes gradients back (torch.distributed.nn.functional's
    all_reduce, which is deprecated with a FutureWarning); ``x`` in a single process."""
    return _AllReduceSum.apply(x) if _ready() else x


def all_gather_1d(x: torch.Tensor) -> torch.Tensor:
    """Concatenate a 1-D tensor over ranks (rank order); lengths may differ between ranks."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    x = x.reshape(-1).contiguous()
    n = torch.tensor([x.numel()], device=x.device, dtype=torch.int64)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    m = max(sizes)
    padded = torch.zeros(m, dtype=x.dtype, device=x.device)
    padded[: x.numel()] = x
    out = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(out, padded)
    return torch.cat([o[:s] for o, s in zip(out, sizes)])


def gather_codes(codes: torch.Tensor) -> np.ndarray:
    """All ranks' code ids (flattened, rank order) as int64 numpy."""
    return all_gather_1d(codes.reshape(-1).long()).cpu().numpy()


def all_reduce_sum(values: list[float], device) -> list[float]:
    """Sum a few floats over ranks (exact aggregation of (sum, count) metric pairs)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_reduce_any(mask: np.ndarray, device) -> np.ndarray:
    """Element-wise OR of a bool array over ranks (e.g. the codes seen so far)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return mask
    t = torch.from_numpy(mask.astype(np.int32)).to(device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.cpu().numpy().astype(bool)


def gather_object(obj) -> list:
    """Every rank's ``obj`` (rank order) on every rank; ``[obj]`` in a single process.

    For small per-rank state only (RNG states, counters): it goes through pickle between
    this job's own processes, never from a file.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
