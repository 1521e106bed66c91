"""Tile-parallel schedules: which worker runs which tiles (:func:`assign_tiles`).

One image's tiles are split among ``N`` workers. Each stage ends where the workers combine
their results (:mod:`streamc.steps`), so a stage takes as long as its busiest worker: every
stage is balanced on its own, by the FLOPs of forward and backward of each tile's shape class.
A stage's tiles are cut, in its run order (tiles grouped by shape class, largest crop first),
into ``N`` contiguous runs with the smallest largest sum: a worker runs few shape classes (each
is a session to build and keep), and most classes run on one worker only.

Without halo reuse (strip caches, not built yet) the tiles of a stage are independent: no
worker needs another's intermediate tensors, only the combined buffers between stages.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from streamc.errors import StreamcError
from streamc.passes.flops import backward_flops, count_flops
from streamc.policy import DEFAULT_POLICY, RuntimePolicy
from streamc.program import Program
from streamc.units import format_bytes


@dataclass(frozen=True)
class WorkerShare:
    """One worker's part: its tiles per stage (in run order) and their FLOPs per stage
    (forward and backward of the tile graphs)."""

    worker: int
    tiles: tuple[tuple[int, ...], ...]
    flops: tuple[int, ...]

    @property
    def tile_count(self) -> int:
        """Tile runs over all stages."""
        return sum(len(t) for t in self.tiles)

    @property
    def total_flops(self) -> int:
        return sum(self.flops)


@dataclass(frozen=True)
class TileAssignment:
    """Which worker runs which tiles, stage by stage (see the module docstring)."""

    workers: int
    shares: tuple[WorkerShare, ...]

    def tiles_of(self, worker: int) -> tuple[frozenset[int], ...]:
        """Per stage, the tiles ``worker`` runs (what the interpreter and planner take)."""
        return tuple(frozenset(t) for t in self.shares[worker].tiles)

    @property
    def stage_flops(self) -> tuple[int, ...]:
        return tuple(sum(s.flops[k] for s in self.shares) for k in range(len(self.shares[0].flops)))

    @property
    def balance(self) -> float:
        """Even share over actual: the tile FLOPs of all workers over ``N`` times those of the
        busiest worker of each stage, summed over stages (1.0: perfectly balanced)."""
        busiest = sum(max(s.flops[k] for s in self.shares)
                      for k in range(len(self.shares[0].flops)))
        return sum(self.stage_flops) / (self.workers * busiest) if busiest else 1.0

    def to_json(self) -> dict[str, Any]:
        return {"workers": self.workers, "balance": round(self.balance, 4),
                "shares": [{"worker": s.worker, "tiles": [list(t) for t in s.tiles],
                            "flops": list(s.flops)} for s in self.shares]}


def class_flops(program: Program) -> dict[int, int]:
    """FLOPs of one run of each shape class's forward graph plus its backward graph."""
    result = {}
    for cls in program.meta.classes:
        forward = program.graph(cls.forward)
        result[cls.id] = count_flops(forward) + (
            backward_flops(forward, set(cls.gradients)) if cls.gradients else 0)
    return result


def assign_tiles(program: Program, workers: int, flops: dict[int, int] | None = None
                 ) -> TileAssignment:
    """Split ``program``'s tiles among ``workers`` workers, stage by stage, balanced by FLOPs
    (``flops``: per shape class, from :func:`class_flops` when not given). The same program
    and count always give the same assignment."""
    if workers < 1:
        raise ValueError(f"workers must be at least 1, not {workers}")
    if workers > 1 and program.meta.halo == "reuse":
        raise StreamcError(
            "tile-parallel workers need a program whose tiles are independent: this one hands "
            "strips from tile to tile (halo reuse). Compile it with halo='recompute' "
            "(--halo recompute) to split its tiles among workers.")
    flops = class_flops(program) if flops is None else flops
    meta = program.meta
    per_worker: list[list[tuple[int, ...]]] = [[] for _ in range(workers)]
    per_flops: list[list[int]] = [[] for _ in range(workers)]
    for stage in meta.stages:
        order = list(stage.run_order)
        costs = [flops[meta.tiles[i].parts[stage.index].class_id] for i in order]
        runs = split_contiguous(costs, workers)
        for w, (a, b) in enumerate(runs):
            per_worker[w].append(tuple(order[a:b]))
            per_flops[w].append(sum(costs[a:b]))
    shares = tuple(WorkerShare(w, tuple(per_worker[w]), tuple(per_flops[w]))
                   for w in range(workers))
    return TileAssignment(workers, shares)


def split_contiguous(costs: Sequence[int], parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous runs ``[a, b)`` of ``costs`` whose largest sum is the smallest
    possible; every run is non-empty while there are as many items as runs left."""
    if not costs:
        return [(0, 0)] * parts
    lo, hi = max(costs), sum(costs)
    while lo < hi:  # the smallest bound a greedy cut into `parts` runs meets
        mid = (lo + hi) // 2
        if _runs_needed(costs, mid) <= parts:
            hi = mid
        else:
            lo = mid + 1
    runs: list[tuple[int, int]] = []
    start, total = 0, 0
    for i, cost in enumerate(costs):
        left = parts - len(runs) - 1  # runs after the current one
        if i > start and (total + cost > lo or len(costs) - i <= left):
            runs.append((start, i))
            start, total = i, 0
        total += cost
    runs.append((start, len(costs)))
    runs += [(len(costs), len(costs))] * (parts - len(runs))
    return runs


def _runs_needed(costs: Sequence[int], bound: int) -> int:
    runs, total = 1, 0
    for cost in costs:
        if total + cost > bound:
            runs, total = runs + 1, 0
        total += cost
    return runs


def worker_plans(program: Program, assignment: TileAssignment,
                 policy: RuntimePolicy = DEFAULT_POLICY, optimizer_copies: int = 2) -> list:
    """The memory plan of one training step on each worker
    (:class:`~streamc.passes.memory.MemoryPlan`, its tiles and combine steps only)."""
    from streamc.passes.memory import plan_program

    graph_plans: dict = {}  # each graph is planned once for all workers
    return [plan_program(program, policy=policy, optimizer_copies=optimizer_copies,
                         tiles=assignment.tiles_of(w), graph_plans=graph_plans)
            for w in range(assignment.workers)]


def share_lines(program: Program, workers: int, policy: RuntimePolicy = DEFAULT_POLICY
                ) -> list[str]:
    """What the compile summary and ``streamc plan --workers`` print: each worker's tiles,
    share of the tile FLOPs and predicted peak memory."""
    assignment = assign_tiles(program, workers)
    plans = worker_plans(program, assignment, policy)
    total = sum(assignment.stage_flops) or 1
    stages = len(program.meta.stages)
    lines = [f"workers:      {workers} per image (tile-parallel); FLOP balance "
             f"{assignment.balance:.0%} (tile FLOPs over {workers}x the busiest worker's, "
             f"stage by stage)"]
    for share, plan in zip(assignment.shares, plans):
        counts = "+".join(str(len(t)) for t in share.tiles)
        what = f"{counts} tile{'s' if share.tile_count != 1 else ''}" + (
            f" (per stage, {stages} stages)" if stages > 1 else "")
        classes = sorted({program.meta.tiles[i].parts[k].class_id
                          for k, t in enumerate(share.tiles) for i in t})
        lines.append(f"  worker {share.worker}:   {what}, shape classes "
                     f"{','.join(map(str, classes)) or 'none'}, "
                     f"{share.total_flops / total:.1%} of the tile FLOPs "
                     f"({_flops(share.total_flops)}), predicted peak {format_bytes(plan.peak)}")
    if any(not share.tile_count for share in assignment.shares):
        lines.append(f"note:         {workers} workers for {len(program.tiles)} tiles: some "
                     "have none; compile with a smaller tile to use them all.")
    return lines


def _flops(value: int) -> str:
    return f"{value / 1e9:.2f} GFLOP" if value >= 1e8 else f"{value / 1e6:.1f} MFLOP"


__all__ = ["TileAssignment", "WorkerShare", "assign_tiles", "class_flops", "share_lines",
           "split_contiguous", "worker_plans"]
