"""Process-group setup and every collective clipkit uses.

Ranks come from torchrun (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`) or from SLURM `srun`
(`SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_LOCALID`). Losses and eval code call the
functions here instead of `torch.distributed` so that the math stays collective-free.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_dist_info() -> DistInfo:
    """Reads rank/world from torchrun's env, else SLURM's, else a single process."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistInfo(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and int(env["SLURM_NTASKS"]) > 1:
        return DistInfo(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)))
    return DistInfo()


def export_torch_env(info: DistInfo) -> None:
    """Fills torchrun-style variables from SLURM's so `env://` rendezvous works under srun."""
    os.environ.setdefault("RANK", str(info.rank))
    os.environ.setdefault("WORLD_SIZE", str(info.world_size))
    os.environ.setdefault("LOCAL_RANK", str(info.local_rank))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def apply_timeout(timeout: timedelta) -> None:
    """Gives every process group made so far `timeout` (`launcher.timeout_minutes`).

    The world group gets it at init, but DeepSpeed makes its data-parallel groups with
    `dist.new_group(ranks)`, which take torch's default (30 minutes) instead: without this a
    hung rank held the others in DeepSpeed's gradient all-reduce for 30 minutes, whatever
    the launcher's timeout said.
    """
    if not is_initialized():
        return
    # Public in recent torch; older releases (the pin allows 2.4) only have the private spelling.
    set_timeout = getattr(dist, "set_timeout", None) or dist.distributed_c10d._set_pg_timeout
    for group in list(dist.distributed_c10d._world.pg_map):
        set_timeout(timeout, group)


# What torch's gloo and NCCL backends say when a collective's peer died or went silent.
_LOST_PEER = ("Connection closed by peer", "Connection reset by peer", "Timed out waiting",
              "NCCL communicator was aborted", "Watchdog caught collective operation timeout")


def lost_peer(err: BaseException) -> str | None:
    """The backend's reason, in one line, when `err` is a collective that failed because another
    rank died or stopped answering; None for any other error."""
    text = str(err)
    if not (isinstance(err, dist.DistError) or (isinstance(err, RuntimeError) and any(m in text for m in _LOST_PEER))):
        return None
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(err).__name__)
    return re.sub(r"^\[[^\]]*\.(cc|cpp):\d+\]\s*", "", first)   # gloo's "[.../pair.cc:561] " source prefix


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean of `value` over ranks (a new tensor; no autograd)."""
    if not is_initialized():
        return value.detach().clone()
    out = value.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / dist.get_world_size()


def all_reduce(value: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """`op` ("sum" | "min" | "max") of `value` over ranks, as a new tensor; no autograd."""
    out = value.detach().clone()
    if is_initialized():
        dist.all_reduce(out, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op])
    return out


def all_gather_object(obj) -> list:
    """Every rank's picklable `obj`, in rank order."""
    if not is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_gather_rows(x: torch.Tensor) -> torch.Tensor:
    """[b, ...] per rank -> [W*b, ...] in rank order, no autograd. `x` itself on 1 process."""
    if not is_initialized() or dist.get_world_size() == 1:
        return x.detach()
    out = torch.empty((dist.get_world_size() * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    dist.all_gather_into_tensor(out, x.detach().contiguous())
    return out


def reduce_scatter_rows(x: torch.Tensor) -> torch.Tensor:
    """[W*b, ...] per rank -> [b, ...]: this rank's rows of the sum over ranks. `x` on 1 process.

    Half the traffic of all_reduce + slice: each rank receives only its own rows.
    """
    if not is_initialized() or dist.get_world_size() == 1:
        return x
    ws = dist.get_world_size()
    out = torch.empty((x.shape[0] // ws, *x.shape[1:]), dtype=x.dtype, device=x.device)
    dist.reduce_scatter_tensor(out, x.contiguous())
    return out


def ring_pass(send: torch.Tensor, recv: torch.Tensor) -> list:
    """Starts sending `send` to rank r+1 and receiving rank r−1's tensor into `recv`; returns the
    handles to `wait()` on. Both ends post their sends and receives in the same order, so two
    rings on the same links (SigLIP's text blocks and their gradients) match message for message.
    """
    world, here = dist.get_world_size(), dist.get_rank()
    return dist.batch_isend_irecv([dist.P2POp(dist.isend, send.contiguous(), (here + 1) % world),
                                   dist.P2POp(dist.irecv, recv, (here - 1) % world)])


class _AllGatherWithGrad(torch.autograd.Function):
    """Concatenates equal-shape [b, ...] tensors from every rank into [W*b, ...].

    Backward sums the incoming gradient over ranks and returns this rank's rows, so a
    loss computed from the gathered tensor on each rank sends every rank the full
    gradient for its own rows. This is the naive reference path's gather; the fused
    losses gather without autograd and reduce-scatter their own gradients instead.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ws, rk = dist.get_world_size(), dist.get_rank()
        parts = [torch.empty_like(x) for _ in range(ws)]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.rows = rk, x.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = ctx.rank * ctx.rows
        return grad[start:start + ctx.rows]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """[b, ...] per rank -> [W*b, ...] in rank order, differentiable. Identity on 1 process."""
    if not is_initialized() or dist.get_world_size() == 1:
        return x
    return _AllGatherWithGrad.apply(x)


def gather_variable_rows(x: torch.Tensor) -> torch.Tensor:
    """[n_r, ...] per rank (n_r may differ) -> [sum n_r, ...] in rank order, no autograd.

    Used by eval, where each rank embeds its share of a set; every rank gets the result.
    """
    if not is_initialized() or dist.get_world_size() == 1:
        return x.detach()
    ws = dist.get_world_size()
    n = torch.tensor([x.shape[0]], dtype=torch.long, device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(ws)]
    dist.all_gather(sizes, n)
    sizes = [int(s.item()) for s in sizes]
    padded = torch.zeros((max(sizes), *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[: x.shape[0]] = x.detach()
    parts = [torch.empty_like(padded) for _ in range(ws)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)], dim=0)


_END = object()


def in_lockstep(items, device: torch.device | str = "cpu"):
    """Yields `items`, then None until every rank has run out.

    Eval shares differ by a sample or a batch between ranks, but under ZeRO-3 every
    forward pass is a collective (parameters are gathered per layer), so a rank that
    stops early would hang the others. Callers run a throwaway forward on each None.
    """
    it = iter(items)
    while True:
        item = next(it, _END)
        if is_initialized() and dist.get_world_size() > 1:
            more = torch.tensor([0 if item is _END else 1], device=device)
            dist.all_reduce(more, op=dist.ReduceOp.MAX)
            if int(more.item()) == 0:
                return
        elif item is _END:
            return
        yield None if item is _END else item
