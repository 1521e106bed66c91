"""Data-parallel and tile-parallel training on ``torch.distributed``.

Data-parallel: :class:`~streamc.runtime.module.StreamingModel` is an ordinary module whose
parameters receive their gradients through autograd, so ``DistributedDataParallel``'s hooks fire
for them and ``no_sync`` accumulates; :meth:`Distributed.wrap` wraps it (over the data
dimension of the process grid) with a gradient hook that turns a failed all-reduce into one
clear error.

Tile-parallel: the ``tile_workers`` processes of one *tile group* train on the same image; each
runs the tiles :func:`~streamc.passes.partition.assign_tiles` gives it and the group combines the
results at the program's combine steps (:mod:`streamc.steps`): the stage outputs and partials
(all-reduce of disjoint parts), the gradients of buffers read across workers and the weight
gradients (all-reduce sums). Every worker then holds the whole image's gradient, as one process
would. Tiles are independent (no halo exchange: strip caches are not built yet).

The processes form a grid ``data × tile_workers``: ranks ``[d·T, (d+1)·T)`` are tile group
``d``; the ranks with the same position in their tile groups form a data group, across which
DDP averages. :func:`setup` builds the groups (every collective with ``timeout``), checks that
every process runs the same program (a checksum compared with a collective) and that all are
there (a monitored barrier), broadcasts rank 0's weights, and hands the model its tiles.

    torch.distributed.init_process_group("gloo")          # "nccl" on GPUs; torchrun sets env
    model = StreamingModel(program)
    run = setup(model, tile_workers=2)
    net = run.wrap(model)                                  # DDP over the data dimension
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from streamc.errors import DistributedError
from streamc.passes.partition import TileAssignment, assign_tiles
from streamc.program import Program
from streamc.runtime.workers import Reduce

#: How long a collective waits for the other workers before every worker stops with an error.
DEFAULT_TIMEOUT = timedelta(minutes=10)

#: Every how many pixels the image sample compared between tile workers takes one.
_SAMPLE_STRIDE = 997
_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def program_digest(program: Program) -> str:
    """A checksum of what a program computes: its description and graphs (not where it was
    compiled from, how long that took, nor its initial weights, which :func:`setup`
    broadcasts)."""
    meta = program.meta.to_json()
    for key in ("compile_seconds", "memory_plan", "source"):
        meta.pop(key, None)
    digest = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
    for relative in sorted(program.graphs):
        digest.update(relative.encode())
        digest.update(hashlib.sha256(program.serialized(relative)).digest())
    return digest.hexdigest()


def _reason(exc: BaseException) -> str:
    """The library's message: its first sentence, without its source-file prefix."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = re.sub(r"^\[[^\]]*\.(?:cc|cpp|h|hpp):\d+\]\s*", "", lines[0] if lines else "")
    return re.split(r"\.\s", text)[0].rstrip(".") or type(exc).__name__


def _diagnosis(reason: str, timeout: timedelta) -> str:
    lowered = reason.lower()
    if any(k in lowered for k in ("closed by peer", "connection reset", "broken pipe",
                                  "connection refused", "socket closed")):
        return "another worker died"
    if "timed out" in lowered or "timeout" in lowered:
        return f"another worker did not answer within {timeout.total_seconds():.0f} s"
    return "a collective failed"


class _Collectives:
    """Runs collectives and turns their failures into one :class:`DistributedError`."""

    def __init__(self, rank: int, world: int, timeout: timedelta) -> None:
        self.rank, self.world, self.timeout = rank, world, timeout

    def run(self, what: str, collective: Callable[[], Any]) -> Any:
        try:
            return collective()
        except DistributedError:
            raise
        except (RuntimeError, ValueError) as exc:
            reason = _reason(exc)
            raise DistributedError(
                f"rank {self.rank} of {self.world}: {what} failed: "
                f"{_diagnosis(reason, self.timeout)} ({reason}); every worker stops here."
            ) from None


class TileGroup(_Collectives):
    """One worker of a tile group: its tiles, and the group's collectives
    (:class:`~streamc.runtime.workers.Workers` on ``torch.distributed``)."""

    def __init__(self, group: Any, tile_rank: int, assignment: TileAssignment, rank: int,
                 world: int, timeout: timedelta) -> None:
        super().__init__(rank, world, timeout)
        self.group = group
        self.tile_rank = tile_rank
        self.assignment = assignment
        self.tiles = assignment.tiles_of(tile_rank)
        self.root = tile_rank == 0

    def combine(self, tensor: torch.Tensor, op: Reduce, what: str) -> torch.Tensor:
        target = tensor if tensor.is_contiguous() else tensor.contiguous()
        self.run(f"combining {what} with the other tile workers",
                 lambda: dist.all_reduce(target, op=_OPS[op], group=self.group))
        return target

    def check_input(self, image: torch.Tensor) -> None:
        sample = torch.as_tensor(image).reshape(-1)[::_SAMPLE_STRIDE].double()
        sample = torch.nan_to_num(sample, nan=0.5, posinf=1.5, neginf=-1.5).sum()
        bounds = torch.stack([sample, -sample]).to(torch.float64)
        if bounds.device.type == "cpu" and dist.get_backend(self.group) == "nccl":
            bounds = bounds.cuda()
        self.run("comparing the images with the other tile workers",
                 lambda: dist.all_reduce(bounds, op=dist.ReduceOp.MAX, group=self.group))
        if bounds[0].item() != -bounds[1].item():
            raise DistributedError(
                f"rank {self.rank} of {self.world}: the workers of one image group were given "
                "different images; give every tile worker of a group the same batch (seed or "
                "shard the data by Distributed.data_rank, not by rank).")

    def combine_all(self, tensors: Sequence[torch.Tensor], what: str) -> list[torch.Tensor]:
        if not tensors:
            return []
        flat = torch.cat([t.reshape(-1).to(tensors[0].dtype) for t in tensors])
        self.run(f"combining {what} with the other tile workers",
                 lambda: dist.all_reduce(flat, group=self.group))
        out, start = [], 0
        for t in tensors:
            out.append(flat[start:start + t.numel()].view(t.shape).to(t.dtype))
            start += t.numel()
        return out


@dataclass
class Distributed:
    """The process grid :func:`setup` built, and this process's place in it.

    ``data`` × ``tile_workers`` processes; this one is ``rank``, runs image group
    ``data_rank`` and is worker ``tile_rank`` of its tile group. ``tile_group`` and
    ``data_group`` are its ``torch.distributed`` process groups (None when that dimension is
    1); ``assignment`` says which tiles each worker of a tile group runs, ``workers`` is what
    the model runs with (this process's tiles and its group's collectives).
    """

    data: int
    tile_workers: int
    rank: int
    data_rank: int
    tile_rank: int
    tile_group: Any
    data_group: Any
    assignment: TileAssignment | None
    workers: TileGroup | None
    timeout: timedelta
    _collectives: _Collectives = field(repr=False)

    def wrap(self, model: nn.Module, **ddp_options: Any) -> nn.Module:
        """``model`` in ``DistributedDataParallel`` over the data dimension (itself when there
        is one image group), with a gradient all-reduce that fails with one clear error.
        ``ddp_options`` go to DDP (``device_ids``, ``find_unused_parameters``...)."""
        if self.data == 1:
            return model
        ddp = nn.parallel.DistributedDataParallel(model, process_group=self.data_group,
                                                  **ddp_options)
        ddp.register_comm_hook(self, _average_gradients)
        return ddp


def _average_gradients(run, bucket):  # no annotations: DDP checks them against its own types
    """DDP's default all-reduce (mean over the data group), raising a one-line error on
    failure instead of the library's."""
    buffer = bucket.buffer()
    run._collectives.run("averaging the gradients with the data-parallel workers",
                         lambda: dist.all_reduce(buffer, group=run.data_group))
    buffer.div_(run.data)
    future: torch.futures.Future = torch.futures.Future()
    future.set_result(buffer)
    return future


def setup(model: nn.Module, tile_workers: int = 1, timeout: timedelta | float = DEFAULT_TIMEOUT
          ) -> Distributed:
    """Make ``model`` (a :class:`~streamc.runtime.module.StreamingModel`) one process of a
    ``data × tile_workers`` grid over the initialised default process group (see the module
    docstring). Every process calls it, with the same ``tile_workers``; ``timeout`` (seconds
    or a timedelta) bounds every collective streamc runs. Raises
    :class:`~streamc.errors.DistributedError` on every process when the processes run
    different programs or settings, or one of them does not arrive."""
    from streamc.runtime.module import StreamingModel

    if not isinstance(model, StreamingModel):
        raise DistributedError(f"setup takes the StreamingModel itself (before wrapping it in "
                               f"DDP), not a {type(model).__name__}.")
    if not (dist.is_available() and dist.is_initialized()):
        raise DistributedError(
            "torch.distributed is not initialised: start the processes with torchrun and call "
            "torch.distributed.init_process_group('gloo') ('nccl' on GPUs) before setup.")
    if not isinstance(timeout, timedelta):
        timeout = timedelta(seconds=float(timeout))
    rank, world = dist.get_rank(), dist.get_world_size()
    collectives = _Collectives(rank, world, timeout)
    if not isinstance(tile_workers, int) or tile_workers < 1 or world % tile_workers:
        raise DistributedError(
            f"tile_workers={tile_workers!r} does not divide the {world} processes: give a "
            f"divisor of {world} (1 for data-parallel only).")
    control = collectives.run("creating the control group",
                              lambda: dist.new_group(backend="gloo", timeout=timeout))
    _all_present(control, collectives, timeout)
    _same_everywhere(control, collectives, {
        "program": program_digest(model.program), "tile_workers": tile_workers,
    })
    data = world // tile_workers
    data_rank, tile_rank = divmod(rank, tile_workers)
    tile_group = data_group = None
    for d in range(data):  # every process creates every group, in the same order
        ranks = list(range(d * tile_workers, (d + 1) * tile_workers))
        group = collectives.run("creating the tile groups",
                                lambda r=ranks: dist.new_group(r, timeout=timeout))
        if d == data_rank and tile_workers > 1:
            tile_group = group
    for t in range(tile_workers):
        ranks = list(range(t, world, tile_workers))
        group = collectives.run("creating the data groups",
                                lambda r=ranks: dist.new_group(r, timeout=timeout))
        if t == tile_rank and data > 1:
            data_group = group
    everyone = collectives.run("creating the world group",
                               lambda: dist.new_group(timeout=timeout))
    with torch.no_grad():
        for tensor in model.state_dict().values():
            collectives.run("broadcasting rank 0's weights",
                            lambda t=tensor: dist.broadcast(t, src=0, group=everyone))
    assignment = workers = None
    if tile_workers > 1:
        assignment = assign_tiles(model.program, tile_workers)
        workers = TileGroup(tile_group, tile_rank, assignment, rank, world, timeout)
    model.run_as_worker(workers)
    return Distributed(data, tile_workers, rank, data_rank, tile_rank, tile_group, data_group,
                       assignment, workers, timeout, collectives)


def _all_present(control: Any, collectives: _Collectives, timeout: timedelta) -> None:
    """A monitored barrier: the error names the ranks that did not arrive in time."""
    try:
        dist.monitored_barrier(group=control, timeout=timeout, wait_all_ranks=True)
    except RuntimeError as exc:
        missing = re.findall(r"[Rr]anks? ([\d, ]+) failed", str(exc))
        who = f"rank(s) {missing[0].strip()}" if missing else "a worker"
        raise DistributedError(
            f"rank {collectives.rank} of {collectives.world}: {who} did not reach "
            f"streamc's setup within {timeout.total_seconds():.0f} s ({_reason(exc)}); every "
            "worker stops here.") from None


def _same_everywhere(control: Any, collectives: _Collectives, mine: dict[str, Any]) -> None:
    """Compare settings between processes; every process raises the same error on a
    mismatch."""
    everyone: list[Any] = [None] * collectives.world
    collectives.run("comparing programs",
                    lambda: dist.all_gather_object(everyone, mine, group=control))
    for key in mine:
        values = [entry[key] for entry in everyone]
        odd = [r for r, v in enumerate(values) if v != values[0]]
        if not odd:
            continue
        if key == "program":
            raise DistributedError(
                f"rank {collectives.rank} of {collectives.world}: the workers run different "
                f"programs: rank {odd[0]} has checksum {values[odd[0]][:12]}, rank 0 "
                f"{values[0][:12]} ({len(odd)} of {collectives.world} ranks differ from rank "
                "0); compile the same model with the same image size and tile on every "
                "worker (streamc.runtime.distributed.program_digest(program) is the checksum).")
        raise DistributedError(
            f"rank {collectives.rank} of {collectives.world}: the workers were set up with "
            f"different {key}: rank {odd[0]} {values[odd[0]]!r}, rank 0 {values[0]!r}; pass "
            "the same value on every worker.")


__all__ = ["DEFAULT_TIMEOUT", "Distributed", "TileGroup", "program_digest", "setup"]
