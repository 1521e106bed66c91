"""Distributed training with real processes (torch.multiprocessing, gloo, one thread each).

Oracles: a single process running the same program on the union of the workers' images, and
torch autograd on the full images. Data-parallel (DDP, with gradient accumulation under
``no_sync``) must give the single-process gradients of the union batch; tile-parallel (one
image's tiles split among the workers, alone or in a data × tiles grid, one stage or several)
the single-process streamc gradients and torch's. A mismatch of programs, a dead worker and a
hung worker must give every surviving worker one clear line, not a hang.

The worker side is :mod:`tests.distributed_workers`.
"""

from __future__ import annotations

import copy
import json
import math
import socket
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from click.testing import CliRunner
from torch.nn import functional as F

import zoo
from streamc.cli import main
from streamc.compiler import compile as compile_program
from streamc.errors import StreamcError
from streamc.export import export_torch
from streamc.passes.memory import plan_program
from streamc.passes.partition import assign_tiles, split_contiguous, worker_plans
from streamc.policy import DEFAULT_POLICY
from streamc.runtime.module import StreamingModel
from streamc.runtime.workers import reduce_op
from streamc.steps import COMBINE_KINDS, PHASES, StepKind, program_steps
from tests import blocks, distributed_workers
from tests.distributed_workers import images, labels

RESNET = ((1, 3, 128, 128), 80)  # input shape, tile: a 4x4 grid, 9 shape classes
SENET = ((1, 3, 64, 64), 32)  # four stages (squeeze-and-excitation), 3x3 tiles


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(world: int, spec: dict[str, Any], out: Path, wait: list[int] | None = None,
                limit: float = 120.0) -> dict[int, dict[str, Any]]:
    """Spawn ``world`` workers of ``spec``'s scenario; wait for all (or the ranks in
    ``wait``, then end the others) at most ``limit`` seconds; their records by rank."""
    out.mkdir(parents=True, exist_ok=True)
    spec = {**spec, "out": str(out)}
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=distributed_workers.main, args=(r, world, port, spec))
             for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + limit
    try:
        for r in (range(world) if wait is None else wait):
            procs[r].join(max(0.0, deadline - time.monotonic()))
        hung = [r for r in (range(world) if wait is None else wait) if procs[r].is_alive()]
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    assert not hung, f"workers {hung} did not finish within {limit} s"
    records = {r: torch.load(out / f"{r}.pt") for r in range(world)
               if (out / f"{r}.pt").exists()}
    for r, record in records.items():
        assert "crash" not in record, f"worker {r} crashed:\n{record['crash']}"
    return records


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / (scale or 1.0)


def assert_grads_match(grads: dict[str, torch.Tensor], reference: dict[str, torch.Tensor],
                       tolerance: float, what: str) -> None:
    assert set(grads) == set(reference), what
    worst = max(reference, key=lambda n: rel(grads[n], reference[n]))
    assert rel(grads[worst], reference[worst]) <= tolerance, (what, worst,
                                                              rel(grads[worst], reference[worst]))


def streamc_grads(program, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    model = StreamingModel(program, threads=1)
    F.cross_entropy(model(x), y).backward()
    return {n: p.grad.clone() for n, p in model.onnx_parameters.items()}


def torch_grads(module: torch.nn.Module, x: torch.Tensor, y: torch.Tensor
                ) -> dict[str, torch.Tensor]:
    module = copy.deepcopy(module).eval()
    F.cross_entropy(module(x), y).backward()
    return {n: p.grad.clone() for n, p in module.named_parameters()}


@pytest.fixture(scope="module")
def resnet(tmp_path_factory):
    shape, tile = RESNET
    z = zoo.build("resnet", shape)
    # Tile-parallel workers need independent tiles: halo recompute.
    program = compile_program(z.onnx_model, tile=tile, image=shape[2:], with_flops=False,
                              halo="recompute")
    root = tmp_path_factory.mktemp("programs")
    other = compile_program(z.onnx_model, tile=96, image=shape[2:], with_flops=False,
                            halo="recompute")
    return (program, program.save(root / "resnet"), other.save(root / "resnet96"),
            copy.deepcopy(z.module).eval())


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def test_data_parallel_and_grid_equal_single_process(resnet, tmp_path) -> None:
    """4 workers: DDP with accumulation = the union batch; a 2 x 2 grid and 4 tile workers
    = single-process streamc and torch."""
    program, path, _, module = resnet
    assert len(program.tiles) >= 4 and len(program.classes) >= 3
    classes = 2
    records = run_workers(4, {"scenario": "grid", "program": str(path), "classes": classes,
                              "tile_workers": 2}, tmp_path)
    assert sorted(records) == [0, 1, 2, 3]
    size = program.image_size

    # Data-parallel: rank r, micro-batch m had image 2r + m; the mean over all eight.
    seeds = range(8)
    x = torch.cat([images(s, 1, size) for s in seeds])
    y = torch.cat([labels(s, 1, classes) for s in seeds])
    reference = streamc_grads(program, x, y)
    for r, record in records.items():
        assert_grads_match(record["data_parallel"], reference, 2e-5, f"data-parallel rank {r}")

    # Grid: data group d had the two images of seed d; the mean over both groups.
    x = torch.cat([images(d, 2, size) for d in range(2)])
    y = torch.cat([labels(d, 2, classes) for d in range(2)])
    reference = streamc_grads(program, x, y)
    twin = torch_grads(module, x, y)
    for r, record in records.items():
        assert (record["data_rank"], record["tile_rank"]) == divmod(r, 2)
        assert_grads_match(record["grid"], reference, 2e-5, f"grid rank {r} vs streamc")
        assert_grads_match(record["grid"], {n: twin[n] for n in reference}, 1e-4,
                           f"grid rank {r} vs torch")
    # The two workers of a tile group ran disjoint tiles that cover the image.
    for d in range(2):
        a, b = records[2 * d]["tiles"][0], records[2 * d + 1]["tiles"][0]
        assert a and b and not set(a) & set(b)
        assert sorted(a + b) == list(range(len(program.tiles)))

    # Four tile workers of one batch.
    x, y = images(0, 2, size), labels(0, 2, classes)
    reference = streamc_grads(program, x, y)
    for r, record in records.items():
        assert_grads_match(record["tiles_only"], reference, 2e-5, f"4 tile workers, rank {r}")
        message = record["different_images"]
        assert "\n" not in message and "were given different images" in message, message


class CutAlsoRead(torch.nn.Module):
    """Two stages, and the head reads a buffer that the second stage reads too (through a
    Slice, which ends the grid): its gradient is the head's plus the second stage's tiles'."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.gate = torch.nn.Conv2d(4, 4, 1)
        self.conv2 = torch.nn.Conv2d(4, 5, 3, stride=2, padding=1)
        self.fc = torch.nn.Linear(9, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv(x))
        z = torch.relu(self.conv2(y * torch.sigmoid(self.gate(y.mean((2, 3), keepdim=True)))))
        return self.fc(torch.cat([z.mean((2, 3)), y[:, :, :2, :2].mean((2, 3))], 1))


@pytest.fixture(scope="module")
def multistage(tmp_path_factory):
    """(name, module, program, path) of the multi-stage cases."""
    root = tmp_path_factory.mktemp("programs")
    cases = []
    for name, factory, shape, tile in (
            ("senet", lambda: zoo.randomize_parameters(blocks.SENet("efficientnet")), SENET[0],
             SENET[1]),
            ("cut_also_read", lambda: CutAlsoRead().eval(), (1, 3, 32, 32), 16)):
        torch.manual_seed(0)
        module = factory()
        program = compile_program(export_torch(module, shape), tile=tile, image=shape[2:],
                                  with_flops=False, halo="recompute")
        cases.append((name, module, program, program.save(root / name)))
    return cases


def test_multistage_tile_parallel_equals_single_process_and_torch(multistage, tmp_path) -> None:
    """3 tile workers on squeeze-and-excitation (four stages, global graphs between them) and
    on a net whose head reads a buffer a later stage reads too: partials, side inputs, buffers
    read across stages and the head's share of their gradients are combined correctly."""
    senet, cut = multistage[0][2], multistage[1][2]
    assert len(senet.meta.stages) == 4 and len(senet.tiles) == 9
    read_later = set(cut.meta.stages[1].inputs)
    assert read_later & set(cut.meta.head.inputs) and len(cut.tiles) == 9
    records = run_workers(3, {"scenario": "tile_parallel", "programs": [
        (name, str(path), 3) for name, _, _, path in multistage]}, tmp_path / "out")
    for name, module, program, _ in multistage:
        x, y = images(0, 2, program.image_size), labels(0, 2, 3)
        reference = streamc_grads(program, x, y)
        twin = torch_grads(module, x, y)
        single = StreamingModel(program, threads=1)
        opt = torch.optim.SGD(single.parameters(), lr=0.1)
        F.cross_entropy(single(x), y).backward()
        opt.step()
        with torch.no_grad():
            after = single(x)
        for stage in range(len(program.meta.stages)):
            runs = [records[r][name]["tiles"][stage] for r in range(3)]
            assert sorted(t for run in runs for t in run) == list(range(9))
            assert all(runs)
        for r in range(3):
            record = records[r][name]
            assert_grads_match(record["grads"], reference, 2e-5, f"{name} rank {r} vs streamc")
            assert_grads_match(record["grads"], {n: twin[n] for n in reference}, 1e-4,
                               f"{name} rank {r} vs torch")
            assert rel(record["after_step"], after) <= 1e-5, (name, r)


def test_program_mismatch_is_one_error_on_every_worker(resnet, tmp_path) -> None:
    _, path, other, _ = resnet
    records = run_workers(2, {"scenario": "mismatch", "program": str(path),
                              "other": str(other)}, tmp_path, limit=60)
    assert sorted(records) == [0, 1]
    for r, record in records.items():
        assert "passed_setup" not in record
        message = record["error"]
        assert "\n" not in message and "different programs" in message, message
        assert message.startswith(f"rank {r} of 2"), message


def test_dead_worker_is_one_error_not_a_hang(resnet, tmp_path) -> None:
    _, path, _, _ = resnet
    records = run_workers(2, {"scenario": "dead_worker", "program": str(path)}, tmp_path,
                          limit=60)
    assert 1 not in records  # it died
    message = records[0]["error"]
    assert "\n" not in message and message.startswith("rank 0 of 2: "), message
    assert "with the other tile workers failed: another worker died" in message, message
    assert records[0]["after_mark"] < 30  # well before the collectives' timeout


def test_hung_worker_times_out_with_one_error(resnet, tmp_path) -> None:
    _, path, _, _ = resnet
    timeout = 4
    records = run_workers(2, {"scenario": "hung_worker", "program": str(path),
                              "timeout": timeout}, tmp_path, wait=[0], limit=60)
    message = records[0]["error"]
    assert "\n" not in message and "averaging the gradients" in message, message
    assert timeout - 1 <= records[0]["after_mark"] < timeout + 20


# --------------------------------------------------------------------------------------------
# The schedule, the steps and the plans (no processes)


def test_worker_steps_split_the_tiles_and_meet_at_the_same_combine_steps(multistage) -> None:
    program = multistage[0][2]
    meta = program.meta
    single = program_steps(meta, DEFAULT_POLICY)
    assignment = assign_tiles(program, 3)
    workers = [program_steps(meta, DEFAULT_POLICY, tiles=assignment.tiles_of(w))
               for w in range(3)]
    for phase in PHASES:
        assert not [s for s in single[phase] if s.kind in COMBINE_KINDS]
        tile_steps = sorted((s.kind.value, s.stage, s.tile) for w in workers for s in w[phase]
                            if s.tile is not None)
        assert tile_steps == sorted((s.kind.value, s.stage, s.tile) for s in single[phase]
                                    if s.tile is not None), phase
        # Every worker runs the same collectives in the same order (or they would deadlock).
        shared = [[s for s in w[phase] if s.tile is None and s.kind is not StepKind.RELEASE]
                  for w in workers]
        assert shared[0] == shared[1] == shared[2], phase
    forward, backward = workers[0]["prefix_forward"], workers[0]["prefix_backward"]
    for stage in meta.stages:  # a stage's buffers are combined after its tiles, before use
        combined = [k for k, s in enumerate(forward) if s.kind is StepKind.COMBINE
                    and s.stage == stage.index]
        assert {forward[k].name for k in combined} == {*stage.outputs, *stage.partials}
        later = [k for k, s in enumerate(forward) if s.stage is not None
                 and s.stage > stage.index]
        assert not later or max(combined) < min(later)
    assert backward[-1].kind is StepKind.COMBINE_WEIGHT_GRADIENTS
    read_later = {n for s in meta.stages[1:] for n in s.inputs}
    side = {n for s in meta.stages for n in s.side_inputs}
    gradients = {s.name for s in backward if s.kind is StepKind.COMBINE_GRADIENT}
    assert gradients == (read_later | side) and read_later and side


def test_reduce_op_follows_the_buffer_identity() -> None:
    assert (reduce_op(0.0), reduce_op(float("-inf")), reduce_op(float("inf"))) == \
        ("sum", "max", "min")
    with pytest.raises(ValueError):
        reduce_op(1.0)


def test_worker_plans_and_plan_command_show_each_share(resnet, tmp_path, onnx_file) -> None:
    program = resnet[0]
    assignment = assign_tiles(program, 2)
    plans = worker_plans(program, assignment)
    single = plan_program(program)
    for share, plan in zip(assignment.shares, plans):
        assert sum(c.tiles for c in plan.classes) == share.tile_count
        assert {c.id for c in plan.classes} < {c.id for c in single.classes}
        assert "combine" in plan.phases and "combine weight gradients" in plan.phases
        mine, everyone = plan.resident, single.resident  # the whole image, weights, ...
        assert (mine.image, mine.parameters, mine.gradients) == \
            (everyone.image, everyone.parameters, everyone.gradients)
        assert mine.runtime < everyone.runtime  # ... but fewer sessions
    model = onnx_file(zoo.build("resnet", RESNET[0]))
    result = CliRunner().invoke(main, ["plan", str(model), "--image", "128x128", "--tile",
                                       str(RESNET[1]), "--workers", "2", "--halo", "recompute"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stdout.splitlines() if line.startswith("  worker ")]
    assert len(lines) == 2 and all("predicted peak" in line for line in lines)
    result = CliRunner().invoke(main, ["plan", str(model), "--image", "128x128", "--tile",
                                       str(RESNET[1]), "--workers", "2", "--halo", "recompute",
                                       "--json"])
    shares = json.loads(result.stdout)["workers"]["shares"]
    assert sorted(t for s in shares for t in s["tiles"][0]) == list(range(len(program.tiles)))


def test_tile_parallel_refuses_a_program_that_hands_strips_on(onnx_file, tmp_path) -> None:
    shape, tile = RESNET
    z = zoo.build("resnet", shape)
    program = compile_program(z.onnx_model, tile=tile, image=shape[2:], with_flops=False)
    assert program.meta.halo == "reuse"
    assert assign_tiles(program, 1).balance == 1
    with pytest.raises(StreamcError, match="halo='recompute'"):
        assign_tiles(program, 2)
    result = CliRunner().invoke(main, ["plan", str(onnx_file(z)), "--image", "128x128",
                                       "--tile", str(tile), "--workers", "2"])
    assert result.exit_code == 2 and "--halo recompute" in result.stderr
    target = tmp_path / "never.streamc"  # refused before compiling: nothing is written
    result = CliRunner().invoke(main, ["compile", str(onnx_file(z)), "--image", "128x128",
                                       "--tile", str(tile), "--workers", "2", "-o", str(target)])
    assert result.exit_code == 2 and "--halo recompute" in result.stderr
    assert not target.exists()


def test_contiguous_split_is_optimal_and_uses_every_worker() -> None:
    costs = [5, 1, 1, 1, 4, 4, 2, 2]
    runs = split_contiguous(costs, 3)
    assert runs[0][0] == 0 and runs[-1][1] == len(costs)
    assert all(a < b for a, b in runs) and all(runs[k][1] == runs[k + 1][0] for k in range(2))
    best = min(max(sum(costs[:i]), sum(costs[i:j]), sum(costs[j:]))
               for i in range(1, 7) for j in range(i + 1, 8))
    assert max(sum(costs[a:b]) for a, b in runs) == best
    assert split_contiguous([3, 3], 4) == [(0, 1), (1, 2), (2, 2), (2, 2)]


def test_assignment_is_balanced_and_partitions_the_tiles(resnet) -> None:
    program = resnet[0]
    for workers in (1, 2, 3, len(program.tiles)):
        a = assign_tiles(program, workers)
        tiles = sorted(t for s in a.shares for t in s.tiles[0])
        assert tiles == list(range(len(program.tiles)))
        assert math.isclose(sum(s.total_flops for s in a.shares), sum(a.stage_flops))
        assert 0 < a.balance <= 1
        assert a == assign_tiles(program, workers)  # deterministic
    assert assign_tiles(program, 1).balance == 1
