"""The distributed context of serving: the process group, and every collective the serving loop makes.

`init_distributed` joins the default process group (NCCL with CUDA, gloo on CPU) with a timeout on every
collective; `Collectives` makes the loop's calls through it and turns any failure (a peer that died or stalled,
a broken connection) into one `ServeError` line naming the rank, the collective and the MoE layer. After a
failure the group is marked broken and `shutdown` leaves it to the process's exit: destroying a group whose
peer is gone can block on that peer. This is the only module of moeless that imports torch.distributed.
"""
from __future__ import annotations

import math
import os
import re
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

__all__ = ["Collectives", "DistContext", "ServeError", "free_port", "init_distributed", "shutdown"]

_BROKEN = False  # a collective failed in this process: the group cannot be destroyed cleanly


class ServeError(RuntimeError):
    """A distributed serving failure: a peer rank died or stalled, or the ranks disagree.

    results: when raised by `ExpertParallelServer.serve`, every request's Result (served ones with their tokens,
    the others with the reason they were not)."""

    def __init__(self, message: str, results: list | None = None):
        super().__init__(message)
        self.results = results


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    device: torch.device
    backend: str
    timeout_s: float

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(*, backend: str | None = None, timeout_s: float = 120.0, rank: int | None = None,
                     world_size: int | None = None, init_method: str | None = None) -> DistContext:
    """Join (or create) the default process group: NCCL when CUDA is present, gloo otherwise.

    rank / world_size / init_method default to torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR/PORT);
    a single process without them gets a world of one on a free local port. `timeout_s` bounds every
    collective, so a dead or stalled peer becomes an error instead of a hang."""
    global _BROKEN
    if isinstance(timeout_s, bool) or not (isinstance(timeout_s, (int, float)) and math.isfinite(timeout_s)
                                           and timeout_s > 0):
        raise ValueError(f"timeout_s must be a finite number > 0, got {timeout_s!r}")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"backend must be 'nccl' or 'gloo', got {backend!r}")
    if rank is None:
        rank = int(os.environ.get("RANK", 0))
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", 1))
    if init_method is None and "MASTER_ADDR" not in os.environ:
        init_method = f"tcp://127.0.0.1:{free_port()}" if world_size == 1 else None
        if init_method is None:
            raise ValueError("init_method: no MASTER_ADDR in the environment; start with torchrun or pass one")
    if backend == "nccl":
        local = int(os.environ.get("LOCAL_RANK", rank % max(1, torch.cuda.device_count())))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        kwargs = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=timeout_s), **kwargs)
        _BROKEN = False
    return DistContext(dist.get_rank(), dist.get_world_size(), device, backend, float(timeout_s))


def shutdown(sync: bool = False) -> None:
    """Destroy the default process group if there is one (call it in a `finally`); a group that a failed
    collective broke is left to the process's exit. sync: first wait until every rank got here (a barrier,
    under the group's timeout): call it so where every rank ends normally. A rank that tears its gloo pairs
    down while a peer is still finishing its last collective can make the peer abort ("terminate called
    without an active exception", SIGABRT) instead of exiting."""
    if dist.is_available() and dist.is_initialized() and not _BROKEN:
        if sync:
            try:
                dist.barrier()
            except Exception:  # noqa: BLE001 -- a peer that is gone: nothing left to wait for
                pass
        dist.destroy_process_group()


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for a local process group)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_line(err: BaseException) -> str:
    """The backend's error as one short line: its first line, without the C++ source location gloo puts in
    front and the advice it appends."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    text = re.sub(r"^\[[^\]]*\]\s*", "", lines[0]) if lines else type(err).__name__
    return text.split(". This is typically caused", 1)[0]


class Collectives:
    """The serving loop's collectives on the default group; a failure is one ServeError line."""

    def __init__(self, ctx: DistContext):
        self.ctx = ctx
        self.rank, self.world = ctx.rank, ctx.world_size

    def run(self, what: str, layer: int | None, fn):
        global _BROKEN
        try:
            return fn()
        except Exception as err:  # gloo / NCCL raise RuntimeError subclasses (DistBackendError, ...)
            _BROKEN = True
            where = f"{what} of MoE layer {layer}" if layer is not None else what
            raise ServeError(f"rank {self.rank} of {self.world}: {where} failed (timeout {self.ctx.timeout_s:g} s): "
                             f"a peer rank died or stalled: {_one_line(err)}") from err

    def all_gather(self, layer: int, tensor: torch.Tensor) -> torch.Tensor:
        """[G, *tensor.shape]: every rank's tensor, in rank order."""
        if self.world == 1:
            return tensor[None]
        parts = [torch.empty_like(tensor) for _ in range(self.world)]
        self.run("all-gather of expert counts", layer, lambda: dist.all_gather(parts, tensor))
        return torch.stack(parts)

    def all_to_all(self, what: str, layer: int, out: torch.Tensor, inp: torch.Tensor, out_splits: list,
                   in_splits: list, async_op: bool = False):
        """Uneven all-to-all of rows: in_splits[g] rows of `inp` go to rank g, out_splits[g] come from it."""
        return self.run(what, layer, lambda: dist.all_to_all_single(
            out, inp, output_split_sizes=out_splits, input_split_sizes=in_splits, async_op=async_op))

    def wait(self, what: str, layer: int, work) -> None:
        self.run(what, layer, work.wait)

    def all_gather_object(self, what: str, obj) -> list:
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        self.run(what, None, lambda: dist.all_gather_object(out, obj))
        return out

    def barrier(self, what: str) -> None:
        if self.world == 1:
            return
        if self.ctx.backend == "gloo":  # names the rank that never arrived
            self.run(f"barrier at {what}", None,
                     lambda: dist.monitored_barrier(timeout=timedelta(seconds=self.ctx.timeout_s)))
        else:
            self.run(f"barrier at {what}", None, dist.barrier)
