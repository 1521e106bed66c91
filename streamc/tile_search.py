"""Choosing the tile size: compile candidate tiles of one analysed model, plan each, pick one.

:func:`search_tiles` analyses the model once, plans conventional training once, and compiles
each candidate tile once (its memory plan comes from the compiler's memory-plan pass), from the
largest down when a budget is given, stopping at the first that fits: larger tiles run fewer
tile graphs (and, with recomputed halos, recompute less), so that is the tile a budget picks, and
the small tiles, whose compilation is the slowest
(many tiles and shape classes), are compiled only when nothing larger fits. The chosen
:class:`TilePlan` carries its compiled :class:`~streamc.program.Program`: nothing is compiled
twice. ``streamc compile --memory-budget`` and ``streamc plan --memory-budget`` both use it, so
one budget gives one tile. With ``keep_tiles="auto"`` the chosen tile then spends what is left of
the budget on tiles that keep their activations (:func:`keep_within`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import onnx

from streamc._gc import paused_gc
from streamc.analysis import Analysis
from streamc.analysis.analyze import analyze_checked
from streamc.compiler import GridEnd, compile_state, source_of
from streamc.errors import CompileError, StreamcError
from streamc.graph import load_model_serialized
from streamc.passes.memory import ConventionalPlan, MemoryPlan, plan_conventional, plan_program
from streamc.passes.schedule import DEFAULT_HALO, MAX_TILES, smallest_tile
from streamc.policy import DEFAULT_POLICY, RuntimePolicy
from streamc.program import Program
from streamc.units import format_bytes, parse_bytes

Progress = Callable[[str], None]


@dataclass
class TilePlan:
    """One candidate tile size of a model: its FLOPs and predicted memory (bytes).

    ``overhead`` is tiled over untiled FLOPs of forward and backward together, the untiled
    backward recomputing the forward once (1.0: each activation computed twice, as recomputing
    untiled training does; below 1 where a tile keeps its activations); ``peak`` is
    :attr:`MemoryPlan.peak`; ``conventional`` the full-image figure of the same model;
    ``kept_tiles``: how many tiles keep their activations from forward to backward.
    ``program`` is the compiled program itself.
    """

    tile: int
    kept_tiles: int
    tile_size: list[int]
    grid: list[int]
    tiles: int
    classes: int
    forward_overhead: float
    backward_overhead: float
    overhead: float
    forward_peak: int
    backward_peak: int
    peak: int
    session_arenas: int
    conventional: int
    plan: MemoryPlan = field(repr=False, compare=False)
    program: Program = field(repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k not in ("plan", "program")}
        d["memory_plan"] = self.plan.to_dict()
        return d


@dataclass
class TileSearch:
    """What :func:`search_tiles` found: the plans (in increasing tile size), the chosen one
    (with a budget), and how many programs it compiled."""

    analysis: Analysis
    conventional: ConventionalPlan
    plans: list[TilePlan]
    chosen: TilePlan | None
    compiled: int
    seconds: float


#: Under halo reuse, candidate tiles go down to this many elements (pixels, voxels) of the
#: image at least (256² in 2-D, 41³ in 3-D), however wide the receptive field: below it a step
#: pays more for its many tile runs than for its arithmetic (ResNet-18 at 1024²,
#: ``benchmarks/results/halo_step_1024_keep.json``: tile 512 1.76x torch's step, 256 2.47x).
REUSE_FLOOR_ELEMENTS = 2 ** 16


def candidate_tiles(analysis: Analysis, factor: float = 2 ** 0.5,
                    halo: str = DEFAULT_HALO) -> list[int]:
    """Tile sizes worth planning, from a floor up by ``factor`` each step (multiples of the
    alignment) to the first that holds the whole image in one tile.

    With ``halo="recompute"`` the floor is the smallest tile whose kept region is as wide as
    its halo (twice :func:`~streamc.passes.schedule.smallest_tile` less one alignment step):
    below it a tile recomputes more than it keeps, and needs no less memory either, since every
    shape class adds a baked session holding a copy of the weights (ResNet-18 at 2048²: tile
    448 has 196 classes and a 9.45 GiB plan; tile 864, the floor, 9 classes and 731 MiB).
    With ``halo="reuse"`` a tile computes only what it owns, so the floor is at most
    :data:`REUSE_FLOOR_ELEMENTS`: tiles smaller than the receptive field are candidates too
    (DenseNet-121 at 4096², whose recompute floor is the whole image, plans tile 256 up), and
    of the tiles that split the image into the same grid only the smallest is kept.
    """
    align = max(analysis.alignment)
    largest = -(-max(analysis.image_size) // align) * align
    smallest = smallest_tile(analysis)
    t = float(max(smallest, 2 * smallest - align))
    if halo == "reuse":
        t = min(t, max(float(align), REUSE_FLOOR_ELEMENTS ** (1 / analysis.n_spatial)))
    tiles: list[int] = []
    grids: set[tuple[int, ...]] = set()
    while True:
        snapped = min(largest, -(-int(t) // align) * align)
        # Tiles that own equal shares of the image give one program: plan it once.
        grid = tuple(-(-size // snapped) for size in analysis.image_size)
        if (not tiles or snapped > tiles[-1]) and not (halo == "reuse" and grid in grids):
            tiles.append(snapped)
            grids.add(grid)
        if snapped >= largest:
            return tiles
        t *= factor


def search_tiles(model: str | Path | onnx.ModelProto, image: Sequence[int] | None, *,
                 tiles: Sequence[int] | None = None, budget: int | str | None = None,
                 input: str | None = None, exact: bool = False, optimizer_copies: int = 2,
                 policy: RuntimePolicy = DEFAULT_POLICY, progress: Progress | None = None,
                 max_tiles: int = MAX_TILES, halo: str = DEFAULT_HALO,
                 keep_tiles: int | Literal["auto"] | None = None,
                 keep_stride: int | None = None, grid_end: GridEnd = "auto") -> TileSearch:
    """Compile and plan ``model`` at each tile size in ``tiles`` (default
    :func:`candidate_tiles`); with ``budget`` (bytes or a size such as ``'8GiB'``) from the
    largest down, stopping at the first that fits, which is :attr:`TileSearch.chosen`.

    Raises :class:`~streamc.errors.CompileError` when even the least demanding planned tile
    does not fit the budget (naming the least budget that would), and at once, before any
    compilation, when what every tiling keeps resident (image, weights, gradients, optimizer
    state, cut tensors and their gradients) already exceeds it. ``progress`` receives one line
    per candidate. ``halo``: as :func:`streamc.compile`. ``keep_tiles``: a number, as
    :func:`streamc.compile`, for every candidate; ``"auto"`` (with a budget): the candidates keep
    the default tiles, and the chosen one then keeps as many more as the budget allows.
    ``keep_stride``: as :func:`streamc.compile`, for every candidate (not with ``"auto"``).
    ``grid_end``: as :func:`streamc.compile`, for every candidate (``"auto"`` weighs each
    tile's own cuts against its own whole-grid peak, not against the budget).
    """
    started = time.perf_counter()
    limit = parse_bytes(budget) if budget is not None else None
    if keep_tiles == "auto" and limit is None:
        raise StreamcError("keep_tiles='auto' spends what a memory budget leaves: give a budget.")
    if keep_tiles == "auto" and keep_stride is not None:
        raise StreamcError("keep_tiles='auto' fills the budget with whole kept tiles: give it or "
                           "keep_stride, not both.")
    fixed = None if keep_tiles == "auto" else keep_tiles
    say = progress or (lambda _line: None)
    with paused_gc():
        proto, serialized = load_model_serialized(model)
        analysis = analyze_checked(proto, image, input)
        if any(s is None for s in analysis.image_size):
            raise CompileError(
                "the model's spatial size is dynamic: pass the image size (--image HxW) to "
                "plan it.")
        conventional = plan_conventional(analysis, optimizer_copies=optimizer_copies)
        if limit is not None:
            _refuse_hopeless(analysis, conventional, limit)
        # Halo reuse makes progress on any tile its schedule accepts (it names the least).
        smallest = smallest_tile(analysis) if halo == "recompute" else 1
        sizes = (sorted({int(t) for t in tiles}) if tiles
                 else candidate_tiles(analysis, halo=halo))
        usable = [t for t in sizes if t >= smallest]
        if not usable:
            raise CompileError(
                f"no tile size in {list(sizes)} is large enough for this model: the smallest "
                f"that works is {smallest}.")
        source = source_of(model, serialized)
        plans: list[TilePlan] = []
        order = usable if limit is None else list(reversed(usable))
        for k, t in enumerate(order):
            say(f"planning tile {t} ({k + 1} of at most {len(order)})")
            plan = _plan_tile(analysis, t, source, conventional, policy, exact,
                              optimizer_copies, max_tiles, halo, fixed, keep_stride, grid_end)
            plans.append(plan)
            if limit is not None and plan.peak <= limit:
                break
    plans.sort(key=lambda p: p.tile)
    chosen = select_tile(plans, limit) if limit is not None else None
    compiled = len(plans)
    if chosen is not None and keep_tiles == "auto":
        with paused_gc():
            filled, extra = keep_within(chosen, limit, analysis, source, conventional, policy,
                                        exact, optimizer_copies, max_tiles, halo, say)
        compiled += extra
        plans = [filled if p is chosen else p for p in plans]
        chosen = filled
    return TileSearch(analysis, conventional, plans, chosen, compiled,
                      time.perf_counter() - started)


def keep_within(chosen: TilePlan, limit: int, analysis: Analysis, source,
                conventional: ConventionalPlan, policy: RuntimePolicy, exact: bool,
                optimizer_copies: int, max_tiles: int, halo: str,
                say: Progress) -> tuple[TilePlan, int]:
    """``chosen`` with as many tiles keeping their activations as ``limit`` allows, and how
    many programs that compiled (0 when every tile keeps already, 1 when every tile keeping
    fits or no more than before does, else 2).

    The tile is compiled once with every tile of its last stage keeping; the plans of keeping
    the last n of them (those whose backward runs first) are made from that program alone,
    searching n by bisection (the peak grows with n); the tile is then compiled with the n
    found."""
    before = chosen.program.meta.kept_tiles
    if before >= len(chosen.program.tiles):
        return chosen, 0
    say(f"keeping more tiles' activations at tile {chosen.tile} within the budget")
    grid_end = chosen.program.meta.grid_end or None  # the chosen program's, named or auto's
    every = _plan_tile(analysis, chosen.tile, source, conventional, policy, exact,
                       optimizer_copies, max_tiles, halo, len(chosen.program.tiles),
                       grid_end=grid_end)
    kept = every.program.meta.kept
    if every.program.meta.halo != "reuse":  # kept in run order: the first ones go back first
        kept = tuple(reversed(kept))

    graph_plans: dict = {}  # the same graphs for every n: plan each once

    def peak(n: int) -> int:
        view = replace(every.program,
                       meta=replace(every.program.meta, kept=tuple(sorted(kept[len(kept) - n:]))))
        return plan_program(view, conventional, policy=policy, optimizer_copies=optimizer_copies,
                            exact=exact, graph_plans=graph_plans).peak

    if every.peak <= limit:
        return every, 1
    low, high = before, len(kept)  # peak(low) fits (the chosen plan), peak(high) does not
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if peak(middle) <= limit else (low, middle)
    if low == before:
        return chosen, 1
    filled = _plan_tile(analysis, chosen.tile, source, conventional, policy, exact,
                        optimizer_copies, max_tiles, halo, low, grid_end=grid_end)
    return (filled, 2) if filled.peak <= limit else (chosen, 2)


def _plan_tile(analysis: Analysis, tile: int, source, conventional: ConventionalPlan,
               policy: RuntimePolicy, exact: bool, optimizer_copies: int,
               max_tiles: int, halo: str, keep_tiles: int | None = None,
               keep_stride: int | None = None, grid_end: GridEnd = "auto") -> TilePlan:
    state = compile_state(analysis, tile, source, with_flops=True, with_memory_plan=True,
                          conventional=conventional, policy=policy, exact=exact,
                          optimizer_copies=optimizer_copies, max_tiles=max_tiles, halo=halo,
                          keep_tiles=keep_tiles, keep_stride=keep_stride, grid_end=grid_end)
    program: Program = state["program"]
    plan: MemoryPlan = state["memory_plan"]
    flops = program.meta.flops
    return TilePlan(
        tile=tile, kept_tiles=program.meta.kept_tiles,
        tile_size=list(program.meta.tile), grid=list(program.meta.grid),
        tiles=len(program.tiles), classes=len(program.classes),
        forward_overhead=flops.forward_overhead, backward_overhead=flops.backward_overhead,
        overhead=flops.overhead, forward_peak=plan.forward_peak,
        backward_peak=plan.backward_peak, peak=plan.peak,
        session_arenas=plan.session_arenas, conventional=conventional.total, plan=plan,
        program=program)


def _refuse_hopeless(analysis: Analysis, conventional: ConventionalPlan, limit: int) -> None:
    """Refuse a budget below what every tiling keeps resident, before compiling anything."""
    cuts = sum(4 * _numel(analysis.graph.shape(c)) for c in analysis.cut_tensors)
    floor = (conventional.image + conventional.parameters + conventional.gradients
             + conventional.optimizer + 2 * cuts)
    if floor > limit:
        raise CompileError(
            f"a memory budget of {format_bytes(limit)} cannot fit this model at "
            f"{'x'.join(map(str, analysis.image_size))} with any tile: the image, weights, "
            f"gradients, optimizer state and the cut tensors with their gradients alone take "
            f"{format_bytes(floor)} (cut tensors {format_bytes(2 * cuts)}). Use a budget of "
            f"more than {format_bytes(floor)}, or a smaller image."
        )


def _numel(shape) -> int:
    n = 1
    for d in shape or ():
        n *= int(d or 0)
    return n


def select_tile(plans: Sequence[TilePlan], budget: int | str) -> TilePlan:
    """Among planned tile sizes, the one with the least recompute whose peak fits the budget
    (ties: the smaller peak). Raises :class:`CompileError`, naming the smallest budget that
    would work, when none fits."""
    limit = parse_bytes(budget)
    if not plans:
        raise CompileError("no tile sizes were planned.")
    fitting = [p for p in plans if p.peak <= limit]
    if not fitting:
        least = min(plans, key=lambda p: (p.peak, p.tile))
        raise CompileError(
            f"a memory budget of {format_bytes(limit)} ({limit} bytes) is too small for this "
            f"model at {'x'.join(map(str, least.plan.image_size))}: the least memory any "
            f"planned tile size ({', '.join(str(p.tile) for p in plans)}) needs is "
            f"{format_bytes(least.peak)} ({least.peak} bytes, tile {least.tile}). Use a budget "
            f"of at least {least.peak} bytes (--memory-budget {least.peak})."
        )
    return min(fitting, key=lambda p: (p.overhead, p.peak))


def plans_table(plans: Sequence[TilePlan], chosen: TilePlan | None = None) -> list[str]:
    """Text lines for the CLI: one row per tile size, the chosen one marked."""
    lines = [f"{'tile':>6} {'tiles':>6} {'classes':>7} {'kept':>5} {'FLOPs':>9} {'forward':>11} "
             f"{'backward':>11} {'peak':>11}"]
    for p in plans:
        mark = " <" if chosen is not None and p.tile == chosen.tile else ""
        lines.append(f"{p.tile:>6} {p.tiles:>6} {p.classes:>7} {p.kept_tiles:>5} "
                     f"{p.overhead:>8.2f}x "
                     f"{format_bytes(p.forward_peak):>11} {format_bytes(p.backward_peak):>11} "
                     f"{format_bytes(p.peak):>11}{mark}")
    if plans:
        lines.append("kept: tiles that keep their activations for the backward pass; FLOPs: a "
                     "step's over the untiled step's with one recompute (below 1 where a tile "
                     "keeps its activations)")
        lines.append(f"conventional (full image, all activations kept): "
                     f"{format_bytes(plans[0].conventional)}")
    return lines


# ------------------------------------------------------------------------------------------------
# Plot


def require_matplotlib():
    """``matplotlib.pyplot`` on the Agg backend, or a clear error (checked before any work)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise StreamcError(
            "plotting needs matplotlib, which is not installed: pip install 'streamc[plot]' "
            "(or pip install matplotlib)."
        ) from None
    return plt


def plot_plans(plans: Sequence[TilePlan], conventional: int | None, budget: int | str | None,
               path: str | Path) -> Path:
    """Predicted peak memory and recompute overhead against tile size, with the budget and the
    conventional (full-image) figure as horizontal lines; written to ``path`` (PNG, SVG, PDF).
    Needs matplotlib (``pip install 'streamc[plot]'``)."""
    plt = require_matplotlib()
    if not plans:
        raise StreamcError("nothing to plot: no tile plans were given.")
    xs = [p.tile for p in plans]
    top = max([p.peak for p in plans] + [conventional or 0]
              + [parse_bytes(budget) if budget is not None else 0])
    unit, scale = ("GiB", 2**30) if top >= 2**30 else ("MiB", 2**20)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(xs, [p.peak / scale for p in plans], "o-", color="tab:blue", label="predicted peak")
    ax.plot(xs, [p.plan.resident.total / scale for p in plans], ":", color="tab:blue",
            label="resident (image, weights, optimizer, cut tensors, constants)")
    if conventional:
        ax.axhline(conventional / scale, color="tab:red", ls="--", label="conventional training")
    if budget is not None:
        ax.axhline(parse_bytes(budget) / scale, color="tab:green", ls="-.", label="budget")
    ax.set_xlabel("tile size (input pixels per axis)")
    ax.set_ylabel(f"memory ({unit})")
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.minorticks_off()
    ax.set_ylim(bottom=0)
    right = ax.twinx()
    right.plot(xs, [p.overhead for p in plans], "s-", color="tab:orange",
               label="recompute overhead (FLOPs)")
    right.set_ylabel("tiled / untiled FLOPs")
    right.set_ylim(bottom=min(1.0, *(p.overhead for p in plans)) * 0.95)
    handles = ax.get_legend_handles_labels()
    more = right.get_legend_handles_labels()
    ax.legend(handles[0] + more[0], handles[1] + more[1], fontsize=8, loc="upper center")
    ax.set_title("memory and recompute against tile size")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
