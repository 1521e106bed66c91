"""The worker side of tests/test_distributed.py: what each spawned process runs.

Every process joins a gloo process group over TCP, runs one scenario and writes what it saw
(gradients, outputs, or the error it raised, and how long it took) to ``<out>/<rank>.pt`` for
the test to compare. Kept apart from the test module so that a worker imports neither pytest
nor hypothesis.
"""

from __future__ import annotations

import os
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn import functional as F

import streamc
from streamc.errors import DistributedError
from streamc.runtime.distributed import setup
from streamc.runtime.module import StreamingModel


def images(seed: int, batch: int, size: tuple[int, ...]) -> torch.Tensor:
    """The images of one data-parallel group: the test rebuilds the union from the seeds."""
    g = torch.Generator().manual_seed(1000 + seed)
    return torch.randn((batch, 3, *size), generator=g)


def labels(seed: int, batch: int, classes: int) -> torch.Tensor:
    return torch.arange(seed, seed + batch) % classes


def grads_of(model: StreamingModel) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.onnx_parameters.items()
            if p.grad is not None}


def main(rank: int, world: int, port: int, spec: dict[str, Any]) -> None:
    """Entry point of one spawned worker (``spec``: scenario name, program paths, ...)."""
    torch.set_num_threads(1)
    out = Path(spec["out"])
    started = time.monotonic()
    record: dict[str, Any] = {"rank": rank}
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world, timeout=timedelta(seconds=60))
        SCENARIOS[spec["scenario"]](rank, world, spec, record)
    except DistributedError as exc:
        record["error"] = str(exc)
    except BaseException:  # the test prints it
        record["crash"] = traceback.format_exc()
    record["seconds"] = time.monotonic() - started
    if "mark" in record:  # seconds from the scenario's mark to the end (its error)
        record["after_mark"] = time.monotonic() - record["mark"]
    torch.save(record, out / f"{rank}.pt")
    # After a failed collective the process group cannot be shut down cleanly: leave at once.
    os._exit(0)


def _grid(rank: int, world: int, spec: dict[str, Any], record: dict[str, Any]) -> None:
    """Data-parallel with accumulation (no_sync), then a data x tiles grid, then tiles only."""
    program = streamc.load(spec["program"])
    size, classes = program.image_size, spec["classes"]

    # 1. Data-parallel over every rank, two micro-batches of one image per step.
    model = StreamingModel(program, threads=1)
    run = setup(model, tile_workers=1, timeout=60)
    net = run.wrap(model)
    for micro in range(2):
        seed = 2 * rank + micro
        x, y = images(seed, 1, size), labels(seed, 1, classes)
        if micro == 0:
            with net.no_sync():
                (F.cross_entropy(net(x), y) / 2).backward()
        else:
            (F.cross_entropy(net(x), y) / 2).backward()
    record["data_parallel"] = grads_of(model)

    # 2. Grid: data groups of `tiles` workers, each group one batch of two images.
    tiles = spec["tile_workers"]
    model = StreamingModel(program, threads=1)
    run = setup(model, tile_workers=tiles, timeout=60)
    net = run.wrap(model)
    x, y = images(run.data_rank, 2, size), labels(run.data_rank, 2, classes)
    loss = F.cross_entropy(net(x), y)
    loss.backward()
    record["grid"] = grads_of(model)
    record["grid_loss"] = loss.item()
    record["data_rank"], record["tile_rank"] = run.data_rank, run.tile_rank
    record["tiles"] = [sorted(t) for t in run.assignment.tiles_of(run.tile_rank)]

    # 3. Every rank a tile worker of one image.
    model = StreamingModel(program, threads=1)
    setup(model, tile_workers=world, timeout=60)
    x, y = images(0, 2, size), labels(0, 2, classes)
    F.cross_entropy(model(x), y).backward()
    record["tiles_only"] = grads_of(model)

    # 4. Tile workers given different images: every one of them refuses.
    try:
        model(images(rank, 2, size))
    except DistributedError as exc:
        record["different_images"] = str(exc)


def _tile_parallel(rank: int, world: int, spec: dict[str, Any], record: dict[str, Any]) -> None:
    """Every rank a tile worker of one batch, for each program; one step of SGD, then the
    outputs again."""
    for key, path, classes in spec["programs"]:
        program = streamc.load(path)
        model = StreamingModel(program, threads=1)
        run = setup(model, tile_workers=world, timeout=60)
        x, y = images(0, 2, program.image_size), labels(0, 2, classes)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        with torch.no_grad():
            after = model(x)
        record[key] = {"tiles": [sorted(t) for t in run.assignment.tiles_of(run.tile_rank)],
                       "grads": grads_of(model), "after_step": after}


def _mismatch(rank: int, world: int, spec: dict[str, Any], record: dict[str, Any]) -> None:
    """Rank 0 and the others load different programs."""
    program = streamc.load(spec["program"] if rank == 0 else spec["other"])
    setup(StreamingModel(program, threads=1), tile_workers=world, timeout=30)
    record["passed_setup"] = True


def _dead_worker(rank: int, world: int, spec: dict[str, Any], record: dict[str, Any]) -> None:
    """The last rank dies after setup; the others run a tile-parallel step."""
    program = streamc.load(spec["program"])
    model = StreamingModel(program, threads=1)
    setup(model, tile_workers=world, timeout=30)
    if rank == world - 1:
        os._exit(17)
    record["mark"] = time.monotonic()
    F.cross_entropy(model(images(0, 1, program.image_size)), labels(0, 1, 2)).backward()


def _hung_worker(rank: int, world: int, spec: dict[str, Any], record: dict[str, Any]) -> None:
    """Data-parallel under DDP; the last rank stops answering before its backward pass."""
    program = streamc.load(spec["program"])
    model = StreamingModel(program, threads=1)
    net = setup(model, tile_workers=1, timeout=spec["timeout"]).wrap(model)
    loss = F.cross_entropy(net(images(rank, 1, program.image_size)), labels(rank, 1, 2))
    if rank == world - 1:
        time.sleep(spec["timeout"] + 20)  # the test ends this process
    record["mark"] = time.monotonic()
    loss.backward()


SCENARIOS = {"grid": _grid, "tile_parallel": _tile_parallel, "mismatch": _mismatch,
             "dead_worker": _dead_worker, "hung_worker": _hung_worker}
