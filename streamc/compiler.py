"""``streamc.compile``: model + image size + tile size -> an exact tiled training program.

The model is loaded and analysed (:mod:`streamc.analysis`), then :func:`compile_passes` run in
order under a :class:`~streamc.passes.manager.PassManager`: the schedule, the tile layouts
(each checked exact), the tile graphs per shape class, their backward graphs, the head and its
backward graph, the FLOP accounting, the program itself, and its memory plan.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import onnx

from streamc._gc import paused_gc
from streamc.analysis import Analysis
from streamc.analysis.analyze import (
    StreamedShare,
    analyze_checked,
    grid_end_candidates,
    with_grid_end,
)
from streamc.errors import CompileError
from streamc.graph import FLOAT_TYPES, load_model_serialized
from streamc.meta import (
    BufferSpec,
    ClassSpec,
    FlopCounts,
    GraphSpec,
    InputSpec,
    ParameterSpec,
    ProgramMeta,
    SourceSpec,
    StageSpec,
    TilePart,
    TileSpec,
    WeightWorkSpec,
    tile_run_order,
)
from streamc.passes.autodiff import BackwardGraph, build_backward
from streamc.passes.extract import (
    Parameters,
    extract_global,
    extract_head,
    model_graph,
    model_parameters,
    parameter_values,
    stacked_name,
    tied_parameters,
)
from streamc.passes.flops import backward_flops, count_flops
from streamc.passes.hoist import HoistedGraphs, hoist_weight_work
from streamc.passes.keep import Kept, kept_units, split_recompute
from streamc.passes.manager import Pass, PassManager
from streamc.passes.memory import (
    ConventionalPlan,
    MemoryPlan,
    head_memory,
    plan_conventional,
    plan_program,
)
from streamc.passes.schedule import (
    DEFAULT_HALO,
    MAX_TILES,
    Schedule,
    Tile,
    check_schedule,
    make_schedule,
)
from streamc.passes.tile_graph import (
    HaloReuseUnplaceable,
    TileLayout,
    emit_tile_graph,
    layout_owned,
    layout_tile,
    verify_layout,
)
from streamc.policy import DEFAULT_POLICY, RuntimePolicy
from streamc.program import Program, file_sha256
from streamc.progress import progress_bar

#: How much ``grid_end="auto"`` may raise a training program's planned peak, relative to
#: the whole grid's, to end the grid early (0.10: 10 %).
GRID_END_ALLOWANCE = 0.10

#: :func:`compile`'s ``grid_end``: ``"auto"``, None, or grid tensor names.
GridEnd = str | Sequence[str] | None


def compile(
    model: str | Path | onnx.ModelProto,
    tile: int | str | Sequence[int],
    image: Sequence[int] | None = None,
    input: str | None = None,
    with_flops: bool = True,
    with_memory_plan: bool = True,
    policy: RuntimePolicy = DEFAULT_POLICY,
    max_tiles: int = MAX_TILES,
    mode: ProgramMode = "train",
    reduce_final: bool = True,
    halo: str = DEFAULT_HALO,
    keep_tiles: int | None = None,
    keep_stride: int | None = None,
    grid_end: GridEnd = "auto",
) -> Program:
    """Compile ``model`` into a tiled program for images of size ``image`` ((H, W) or (D, H, W)).

    ``tile`` is the largest input crop per axis (``2048``, ``"2048x1536"`` or a tuple); the
    schedule uses as few tiles as fit it. ``image`` is required when the model's spatial axes
    are dynamic. ``with_flops`` also counts the untiled FLOPs to report recompute overhead;
    ``with_memory_plan`` stores the predicted peak memory under ``policy``
    (``program.memory_plan``). A tile so small that the grid would exceed ``max_tiles`` tiles
    is refused at once. ``mode``: ``"train"`` (backward graphs give the weight gradients),
    ``"inference"`` (no backward graphs: smaller and faster to build; no memory plan) or
    ``"saliency"`` (backward graphs give the gradient of the image, not of the weights).
    ``reduce_final``: the head's whole-image reductions (a classifier's global pool) run tile by
    tile, so the map they reduce is never whole; off, the head reads that map whole (to write
    the feature map, :func:`streamc.predict.predict` with ``features``). ``halo``:
    ``"reuse"`` computes every activation once (tiles hand the strips around them on to the
    tiles after them, docs/architecture.md "Halo reuse"); ``"recompute"``: every tile
    recomputes its halo from the image. ``keep_tiles``: how many tiles of the last stage keep
    their activations from forward to backward instead of recomputing them (the ones whose
    backward runs first); default: those for which that costs no memory (the last tile under
    halo reuse, the only one of a one-tile grid). Each more trades its residuals for its
    recompute; the memory plan counts them. ``keep_stride``: the tiles of the last stage that do not
    keep everything keep the activations of their tensors whose cumulative stride is at least
    this many pixels (the deep layers: small, and as costly to recompute as the large shallow
    ones) and recompute only the rest. ``grid_end``: end the grid early, the rest of the
    network running on whole tensors in the head: ``"auto"`` (default; training programs) at
    the shallowest stride boundary where that raises the planned peak by at most
    ``GRID_END_ALLOWANCE`` over the whole grid's (docs/architecture.md "Ending the grid
    early"), unless ``keep_tiles`` or ``keep_stride`` is given; grid tensor names; or ``None``:
    where the network's local ops end.
    """
    with paused_gc():
        started = time.perf_counter()
        proto, serialized = load_model_serialized(model)
        analysis = analyze_checked(proto, image, input, reduce_final=reduce_final)
        return compile_analysis(analysis, tile, source_of(model, serialized),
                                with_flops=with_flops, with_memory_plan=with_memory_plan,
                                policy=policy, max_tiles=max_tiles, started=started, mode=mode,
                                halo=halo, keep_tiles=keep_tiles, keep_stride=keep_stride,
                                grid_end=grid_end)


def source_of(model: str | Path | onnx.ModelProto, serialized: bytes) -> SourceSpec:
    """Where a program comes from: the model file and its hash (or the hash of a model given
    in memory)."""
    if isinstance(model, onnx.ModelProto):
        return SourceSpec(None, hashlib.sha256(serialized).hexdigest())
    return SourceSpec(str(Path(model).resolve()), file_sha256(model))


def compile_analysis(analysis: Analysis, tile: int | str | Sequence[int], source: SourceSpec,
                     *, with_flops: bool = True, with_memory_plan: bool = True,
                     conventional: ConventionalPlan | None = None,
                     policy: RuntimePolicy = DEFAULT_POLICY, max_tiles: int = MAX_TILES,
                     started: float | None = None, mode: ProgramMode = "train",
                     halo: str = DEFAULT_HALO, keep_tiles: int | None = None,
                     keep_stride: int | None = None, grid_end: GridEnd = "auto") -> Program:
    """Compile an analysed model (see :func:`compile`)."""
    started = time.perf_counter() if started is None else started
    state = compile_state(analysis, tile, source, with_flops=with_flops,
                          with_memory_plan=with_memory_plan, conventional=conventional,
                          policy=policy, max_tiles=max_tiles, mode=mode, halo=halo,
                          keep_tiles=keep_tiles, keep_stride=keep_stride, grid_end=grid_end)
    program: Program = state["program"]
    program.meta.compile_seconds = round(time.perf_counter() - started, 3)
    return program


def compile_state(analysis: Analysis, tile: int | str | Sequence[int], source: SourceSpec, *,
                  with_flops: bool = True, with_memory_plan: bool = True,
                  conventional: ConventionalPlan | None = None,
                  policy: RuntimePolicy = DEFAULT_POLICY, exact: bool = False,
                  optimizer_copies: int = 2, max_tiles: int = MAX_TILES,
                  mode: ProgramMode = "train", halo: str = DEFAULT_HALO,
                  keep_tiles: int | None = None,
                  keep_stride: int | None = None, grid_end: GridEnd = "auto") -> dict[str, Any]:
    """Run the compiler's passes on ``analysis`` and return their results by name
    (``"program"``, ``"memory_plan"`` ...); the program's description holds the memory plan.
    An inference program has no memory plan (the planner plans training steps). ``grid_end``:
    as :func:`compile`; ``"auto"`` compiles the candidates it weighs."""
    if mode not in PROGRAM_MODES:
        raise CompileError(f"mode={mode!r}: choose one of {', '.join(map(repr, PROGRAM_MODES))}.")
    with_memory_plan = with_memory_plan and mode != "inference"
    if keep_tiles is not None and (isinstance(keep_tiles, bool) or not isinstance(keep_tiles, int)
                                   or keep_tiles < 0):
        raise CompileError(f"keep_tiles={keep_tiles!r}: give a number of tiles, 0 or more "
                           "(or None for the tiles that keep at no memory cost).")
    if keep_stride is not None and (isinstance(keep_stride, bool)
                                    or not isinstance(keep_stride, int) or keep_stride < 1):
        raise CompileError(f"keep_stride={keep_stride!r}: give a cumulative stride in pixels, "
                           "1 or more (or None to recompute every tile's activations).")
    if any(s is None for s in analysis.image_size):
        raise CompileError(
            "the model's spatial size is dynamic: pass the image size (--image HxW, or "
            "image=(H, W) in Python) to compile."
        )
    elem_type = analysis.graph.dtypes.get(analysis.input_name, onnx.TensorProto.FLOAT)
    if elem_type != onnx.TensorProto.FLOAT:
        raise CompileError(
            f"the image input {analysis.input_name!r} is "
            f"{onnx.TensorProto.DataType.Name(elem_type).lower()}; streamc programs run in "
            "float32: export the model with a float32 input.")
    options: dict[str, Any] = {"tile": tile, "source": source, "policy": policy,
                               "conventional": conventional, "exact": exact,
                               "optimizer_copies": optimizer_copies, "max_tiles": max_tiles,
                               "mode": mode, "halo": halo, "keep_tiles": keep_tiles,
                               "keep_stride": keep_stride}
    if grid_end != "auto":
        if grid_end is not None:
            analysis = with_grid_end(analysis, grid_end)
        return _run_passes(analysis, options, with_flops, with_memory_plan)
    steered = keep_tiles is not None or keep_stride is not None
    candidates = grid_end_candidates(analysis) if mode == "train" and not steered else []
    if not candidates:
        return _run_passes(analysis, options, with_flops, with_memory_plan)
    whole = _run_passes(analysis, options, with_flops, True)
    if len(whole["program"].tiles) < 2:
        return whole if with_memory_plan else _without_plan(whole)
    limit = whole["memory_plan"].peak * (1 + GRID_END_ALLOWANCE)
    resident = whole["memory_plan"].resident.total
    chosen = whole
    for tensor in candidates:  # the shallowest first; shallow cuts compile fast (short grids)
        ended = with_grid_end(analysis, tensor)
        if resident + head_memory(ended) > limit:
            continue  # its head alone would pass the limit: not worth compiling
        try:
            state = _run_passes(ended, options, with_flops, True)
        except CompileError:
            continue  # this tile does not fit that grid (e.g. too small for its alignment)
        if state["memory_plan"].peak <= limit:
            chosen = state
            break
    return chosen if with_memory_plan else _without_plan(chosen)


def _without_plan(state: dict[str, Any]) -> dict[str, Any]:
    state["program"].meta.memory_plan = None
    state.pop("memory_plan", None)
    return state


def _run_passes(analysis: Analysis, options: dict[str, Any], with_flops: bool,
                with_memory_plan: bool) -> dict[str, Any]:
    """The compiler's passes on ``analysis`` with ``options`` (:data:`_INPUTS`)."""
    with paused_gc():
        state: dict[str, Any] = {"analysis": analysis, **options}
        try:
            PassManager(compile_passes(with_flops, with_memory_plan)).run(state)
        except HaloReuseUnplaceable as exc:
            # Windows that read only padding past a tile's edge (a padding wider than the
            # kernel's reach): recomputing halos places them.
            reason = str(exc).removeprefix("layout: ")
            state = {k: v for k, v in state.items() if k in _INPUTS} | {"halo": "recompute"}
            try:
                PassManager(compile_passes(with_flops, with_memory_plan)).run(state)
            except CompileError as again:
                raise CompileError(f"{reason}; and recomputing halos instead: {again}") from None
            state["program"].meta.notes.append(
                f"{reason}; every tile recomputes its halo instead (halo='recompute').")
    plan = state.get("memory_plan")
    state["program"].meta.memory_plan = plan.to_dict() if plan is not None else None
    return state


# -- the passes -------------------------------------------------------------------------------

#: What the compile state holds before the first pass.
_INPUTS = ("analysis", "tile", "source", "policy", "conventional", "exact", "optimizer_copies",
           "max_tiles", "mode", "halo", "keep_tiles", "keep_stride")

#: What a program's backward graphs differentiate: ``"train"`` the weights, ``"saliency"`` the
#: image, ``"inference"``: there are no backward graphs.
ProgramMode = Literal["train", "inference", "saliency"]
PROGRAM_MODES = ("train", "inference", "saliency")


@dataclass
class Layouts:
    """Every (tile, stage) layout, each one's shape class, and one layout per class."""

    tiles: list[list[TileLayout | None]]  # [tile][stage]
    class_of: list[list[int | None]]  # [tile][stage]
    classes: list[TileLayout]


@dataclass
class GraphAndBackward:
    """A graph on whole buffers (a global graph or the head) and its backward graph."""

    inputs: list[str]
    outputs: dict[str, str]  # buffer or model output -> graph output
    model: onnx.ModelProto
    backward: BackwardGraph | None  # None in an inference program


def _schedule(s: Mapping[str, Any]) -> Schedule:
    return make_schedule(s["analysis"], s["tile"], s["max_tiles"], s["halo"])


def _check_schedule(s: Mapping[str, Any], schedule: Schedule) -> None:
    check_schedule(s["analysis"], schedule)


def _layouts(s: Mapping[str, Any]) -> Layouts:
    analysis, schedule = s["analysis"], s["schedule"]
    stages = analysis.split.stages
    tiles: list[list[TileLayout | None]] = []
    class_of: list[list[int | None]] = []
    classes: list[TileLayout] = []
    by_signature: dict[tuple, int] = {}
    with progress_bar(len(schedule.tiles), "layout") as tick:
        for tile in schedule.tiles:
            row, ids = [], []
            for k in range(stages):
                if not tile.crops[k]:
                    row.append(None)
                    ids.append(None)
                    continue
                layout = (layout_tile(analysis, tile, k) if schedule.ownership is None else
                          layout_owned(analysis, tile, k, schedule.ownership))
                if not (layout.outputs or layout.partials or layout.emits):
                    # Halo reuse: what the tile owns here nobody reads (a strided op skips it).
                    row.append(None)
                    ids.append(None)
                    continue
                signature = layout.signature()
                if signature not in by_signature:
                    by_signature[signature] = len(classes)
                    classes.append(layout)
                row.append(layout)
                ids.append(by_signature[signature])
            tiles.append(row)
            class_of.append(ids)
            tick()
    return Layouts(tiles, class_of, classes)


def _check_layouts(s: Mapping[str, Any], layouts: Layouts) -> None:
    """The layout check: every tile's kept regions are exact (docs/architecture.md)."""
    with progress_bar(len(layouts.tiles), "layout check") as tick:
        for tile, row in zip(s["schedule"].tiles, layouts.tiles):
            for layout in row:
                if layout is not None:
                    verify_layout(s["analysis"], tile, layout)
            tick()


def _tile_graphs(s: Mapping[str, Any]) -> list[onnx.ModelProto]:
    names = s["parameters"].names
    return [emit_tile_graph(s["analysis"], layout, names, name=f"tile{k}_forward")
            for k, layout in enumerate(s["layouts"].classes)]


def _check_tile_graphs(s: Mapping[str, Any], graphs: list[onnx.ModelProto]) -> None:
    for k, (graph, layout) in enumerate(zip(graphs, s["layouts"].classes)):
        expected = len(layout.outputs) + len(layout.partials) + len(layout.emits)
        if len(graph.graph.output) != expected:
            raise CompileError(f"internal error: tile class {k} has {len(graph.graph.output)} "
                               f"outputs for {expected} kept regions and partials.")


def _differentiated(s: Mapping[str, Any], graph: onnx.ModelProto) -> list[str]:
    """The inputs of ``graph`` a backward graph gives gradients of: every buffer between graphs,
    and the trainable parameters (``"train"``) or the image (``"saliency"``)."""
    saliency = s["mode"] == "saliency"
    trainable = set() if saliency else set(s["parameters"].trainable)
    params = s["parameters"].names
    image_name = s["analysis"].input_name
    return [i.name for i in graph.graph.input
            if i.name in trainable or (i.name not in params
                                       and (saliency or i.name != image_name))]


def _backward_graphs(s: Mapping[str, Any]) -> list[BackwardGraph]:
    if s["mode"] == "inference":
        return []
    result = []
    with progress_bar(len(s["tile_graphs"]), "autodiff", unit="class") as tick:
        for k, forward in enumerate(s["tile_graphs"]):
            result.append(build_backward(forward, wrt=_differentiated(s, forward),
                                         outputs=[o.name for o in forward.graph.output],
                                         name=f"tile{k}_backward"))
            tick()
    return result


def _check_backward(s: Mapping[str, Any], graphs: list[BackwardGraph]) -> None:
    if s["mode"] == "inference":
        return
    for k, (forward, backward) in enumerate(zip(s["tile_graphs"], graphs)):
        wanted = set(_differentiated(s, forward))
        outputs = {o.name for o in forward.graph.output}
        if set(backward.gradients) != wanted or set(backward.cotangents) != outputs:
            raise CompileError(f"internal error: the backward graph of tile class {k} does not "
                               "take one cotangent per output and give one gradient per input.")


def _kept(s: Mapping[str, Any]) -> Kept:
    """The units that keep their activations, and their classes' split graphs."""
    backward = s["backward_graphs"]
    if not backward:
        return Kept()
    class_of = s["layouts"].class_of
    grid_order = s["schedule"].ownership is not None
    units = [(k, i) for k, i in kept_units(class_of, grid_order, s["keep_tiles"])
             if backward[class_of[i][k]].gradients]
    graphs = {}
    for k, i in units:
        c = class_of[i][k]
        if c not in graphs:
            graphs[c] = split_recompute(s["tile_graphs"][c], backward[c])
    if s["keep_stride"] is not None:
        # A class has one pair of kept graphs: its other tiles recompute when one keeps all.
        stride = {t: min(info.stride) for t, info in s["analysis"].tensors.items()}

        def deep(node: onnx.NodeProto) -> bool:
            return stride.get(node.output[0], 0) >= s["keep_stride"]

        for k, i in kept_units(class_of, grid_order, count=len(class_of)):
            c = class_of[i][k]
            if backward[c].gradients and (c not in graphs or graphs[c].moved is not None):
                if c not in graphs:
                    graphs[c] = split_recompute(s["tile_graphs"][c], backward[c], keep=deep)
                if (k, i) not in units:
                    units.append((k, i))
    units = [(k, i) for k, i in sorted(units, key=lambda u: (u[0], u[1]))
             if graphs[class_of[i][k]].residuals]
    graphs = {c: g for c, g in graphs.items() if g.residuals}  # else nothing is recomputed
    return Kept(units, graphs)


def _check_kept(s: Mapping[str, Any], kept: Kept) -> None:
    for c, graphs in kept.graphs.items():
        original = s["backward_graphs"][c]
        outputs = {o.name for o in graphs.forward.graph.output}
        inputs = {i.name for i in graphs.backward.model.graph.input}
        if not set(graphs.residuals) <= outputs & inputs or \
                graphs.backward.gradients != original.gradients:
            raise CompileError(f"internal error: tile class {c}'s graphs that keep their "
                               "activations do not hand them over.")


def _backward_to_hoist(s: Mapping[str, Any]) -> list[BackwardGraph]:
    """The tile classes' backward graphs, then the kept units' (in class order)."""
    kept: Kept = s["kept"]
    return list(s["backward_graphs"] or []) + [kept.graphs[c].backward
                                               for c in sorted(kept.graphs)]


def _hoisted(s: Mapping[str, Any]) -> HoistedGraphs:
    return hoist_weight_work(_backward_to_hoist(s), s["parameters"].names)


def _check_hoisted(s: Mapping[str, Any], hoisted: HoistedGraphs) -> None:
    before, after = _backward_to_hoist(s), hoisted.backward
    prepared = set(hoisted.prepared)
    for k, (old, new) in enumerate(zip(before, after)):
        inputs = {i.name for i in new.model.graph.input}
        known = inputs | {t.name for t in new.model.graph.initializer} | {""}
        known |= {o for n in new.model.graph.node for o in n.output}
        missing = {i for n in new.model.graph.node for i in n.input} - known
        added = inputs - {i.name for i in old.model.graph.input}
        if (set(new.gradients) != set(old.gradients) or new.cotangents != old.cotangents
                or missing or added - prepared):
            raise CompileError(f"internal error: hoisting the weight work out of tile class "
                               f"{k}'s backward graph broke it (unread {sorted(missing)[:3]}).")
        for param, output in new.gradients.items():
            if output != old.gradients[param] and param not in hoisted.raw:
                raise CompileError(f"internal error: tile class {k} gives {param!r}'s "
                                   "gradient in a layout no graph moves back.")


def _with_backward(s: Mapping[str, Any], model: onnx.ModelProto, inputs: list[str],
                   outputs: dict[str, str], name: str) -> GraphAndBackward:
    if s["mode"] == "inference":
        return GraphAndBackward(list(inputs), outputs, model, None)
    floats = [o.name for o in model.graph.output if o.type.tensor_type.elem_type in FLOAT_TYPES]
    wrt = [i for i in _differentiated(s, model) if i in inputs or i in s["parameters"].names]
    backward = build_backward(model, wrt=wrt, outputs=floats, name=f"{name}_backward")
    return GraphAndBackward(list(inputs), outputs, model, backward)


def _globals(s: Mapping[str, Any]) -> list[GraphAndBackward]:
    analysis = s["analysis"]
    names = s["parameters"].names
    tiles = len(s["schedule"].tiles)
    result = []
    final = 1 if analysis.split.final_reductions else 0  # a global graph before the head
    for ready in range(1, analysis.split.stages + final):
        graph = extract_global(analysis, ready, names, tiles)
        result.append(_with_backward(s, graph.model, graph.inputs,
                                     {t: t for t in graph.outputs}, f"global{ready}"))
    return result


def _head(s: Mapping[str, Any]) -> GraphAndBackward:
    head = extract_head(s["analysis"], s["parameters"].names)
    return _with_backward(s, head.model, head.inputs, head.outputs, "head")


def _flops(s: Mapping[str, Any]) -> FlopCounts:
    """Tiled and untiled FLOPs, forward and backward: the recompute overhead of tiling; and the
    whole model's forward FLOPs.

    The untiled figures come from the same pass run on one tile that covers the whole image,
    so both sides are counted by the same table on the same kind of graph.
    """
    analysis, layouts = s["analysis"], s["layouts"]
    per_class = []
    for forward in s["tile_graphs"]:
        wrt = set(_differentiated(s, forward))
        per_class.append((count_flops(forward), backward_flops(forward, wrt)))
    whole = _whole_image_tile(analysis)
    untiled_fwd = untiled_bwd = 0
    for k in range(analysis.split.stages):
        layout = layout_tile(analysis, whole, k)
        untiled = emit_tile_graph(analysis, layout, s["parameters"].names, name="untiled")
        untiled_fwd += count_flops(untiled)
        untiled_bwd += backward_flops(untiled, set(_differentiated(s, untiled)))
    used = [k for row in layouts.class_of for k in row if k is not None]
    # A unit that keeps its activations does not recompute its forward, or the part it keeps.
    kept: Kept = s["kept"]
    saved = {c: per_class[c][0] if g.moved is None else count_flops(s["tile_graphs"][c], g.moved)
             for c, g in kept.graphs.items()}
    not_recomputed = sum(saved[layouts.class_of[i][k]] for k, i in kept.units)
    return FlopCounts(
        untiled_forward=untiled_fwd, untiled_backward=untiled_bwd,
        tiled_forward=sum(per_class[k][0] for k in used),
        tiled_backward=sum(per_class[k][1] for k in used) - not_recomputed,
    )


def _whole_image_tile(analysis: Analysis) -> Tile:
    kept = {c: tuple((0, n) for n in analysis.extent(c)) for c in analysis.targets}
    crops = tuple({t: tuple((0, n) for n in analysis.extent(t)) for t in stage.inputs}
                  for stage in analysis.split.stage_io)
    return Tile((0,) * analysis.n_spatial, kept, crops)


def _program(s: Mapping[str, Any]) -> Program:
    analysis: Analysis = s["analysis"]
    schedule: Schedule = s["schedule"]
    layouts: Layouts = s["layouts"]
    params: Parameters = s["parameters"]
    graphs: dict[str, onnx.ModelProto] = {}
    hoisted: HoistedGraphs = s["hoisted"]
    kept: Kept = s["kept"]
    count = len(s["tile_graphs"])
    backward_graphs = hoisted.backward[:count] or [None] * count
    kept_backward = dict(zip(sorted(kept.graphs), hoisted.backward[count:]))
    classes = [_class_spec(k, layout, forward, backward, params, graphs)
               for k, (layout, forward, backward) in enumerate(
                   zip(layouts.classes, s["tile_graphs"], backward_graphs))]
    for k, backward in kept_backward.items():
        classes[k] = _kept_class_spec(classes[k], kept.graphs[k].forward, backward.model,
                                      kept.graphs[k].residuals, graphs)
    tiles = [TileSpec(tuple(t.index), tuple(
        None if layout is None else TilePart(
            layouts.class_of[i][k], dict(t.crops[k]),
            {c: t.kept[c] for c in analysis.split.stage_io[k].targets if c in t.kept},
            dict(layout.bands))
        for k, layout in enumerate(layouts.tiles[i]))) for i, t in enumerate(schedule.tiles)]
    global_specs = [_graph_spec(f"global{k + 1}", g, graphs, k + 1)
                    for k, g in enumerate(s["globals"])]
    head = _graph_spec("head", s["head"], graphs, analysis.split.stages)
    graphs["graphs/model.onnx"] = _export_graph(analysis, params)
    prepare_file = "graphs/prepare.onnx" if hoisted.prepare is not None else ""
    layout_file = "graphs/gradient_layout.onnx" if hoisted.layout is not None else ""
    for file, model in ((prepare_file, hoisted.prepare), (layout_file, hoisted.layout)):
        if file:
            graphs[file] = model
    weight_work = WeightWorkSpec(prepare_file, tuple(hoisted.prepared), layout_file,
                                 dict(hoisted.raw), dict(hoisted.laid_out))
    share = analysis.streamed_share()
    meta = ProgramMeta(
        source=s["source"],
        input=InputSpec(analysis.input_name, tuple(analysis.image_shape),
                        analysis.graph.dtypes.get(analysis.input_name, 1)),
        image_size=tuple(analysis.image_size),
        requested_tile=tuple(schedule.requested_tile),
        tile=tuple(schedule.tile),
        alignment=tuple(schedule.alignment),
        boundaries=tuple(tuple(b) for b in schedule.boundaries),
        notes=list(schedule.notes) + _tied_notes(analysis, params) + share_notes(analysis, share),
        buffers=_buffers(analysis, len(tiles)) + _band_buffers(analysis, schedule, layouts),
        parameters=_parameter_specs(analysis, params),
        stages=_stage_specs(analysis, tiles, grid_order=schedule.ownership is not None),
        classes=classes,
        tiles=tiles,
        globals=global_specs,
        head=head,
        outputs=list(analysis.graph.outputs),
        model="graphs/model.onnx",
        flops=s["flops"],
        streamed=None if share is None else {"flops": round(share.flops, 4),
                                             "activations": round(share.activations, 4)},
        mode=s["mode"],
        halo="recompute" if schedule.ownership is None else "reuse",
        weight_work=weight_work,
        kept=tuple(kept.units),
        keep_stride=s["keep_stride"] if any(g.moved is not None for g in kept.graphs.values())
        else None,
        grid_end=analysis.grid_end,
    )
    return Program(meta, graphs, parameter_values(analysis.graph.constants, params.names))


def _class_spec(k: int, layout: TileLayout, forward: onnx.ModelProto,
                backward: BackwardGraph | None, params: Parameters,
                graphs: dict[str, onnx.ModelProto]) -> ClassSpec:
    fwd_name, bwd_name = f"graphs/tile{k}_forward.onnx", f"graphs/tile{k}_backward.onnx"
    graphs[fwd_name] = forward
    if backward is None:
        bwd_name = ""
    else:
        graphs[bwd_name] = backward.model
    outputs = [o.name for o in forward.graph.output]
    kept = dict(zip(outputs, [t for t, _ in layout.outputs]))
    partial = dict(zip(outputs[len(layout.outputs):],
                       [stacked_name(r) for r, _ in layout.partials]))
    emits = tuple(name for name, _t, _l in layout.emits)
    strips = tuple(name for name, *_ in layout.strips)
    source = {**kept, **partial, **{e: e for e in emits}}
    inputs = [i.name for i in forward.graph.input]
    return ClassSpec(
        id=k, stage=layout.stage, forward=fwd_name, backward=bwd_name,
        inputs={t: tuple(size) for t, size in layout.inputs},
        side_inputs=tuple(n for n in inputs if n not in params.names
                          and n not in dict(layout.inputs) and n not in strips),
        outputs={kept[o]: o for o in kept}, partials={partial[o]: o for o in partial},
        cotangents={} if backward is None else
        {source[o]: c for o, c in backward.cotangents.items()},
        gradients={} if backward is None else dict(backward.gradients),
        parameters=tuple(n for n in inputs if n in params.names),
        strips=strips, emits=emits)


def _kept_class_spec(spec: ClassSpec, forward: onnx.ModelProto, backward: onnx.ModelProto,
                     residuals: list[str], graphs: dict[str, onnx.ModelProto]) -> ClassSpec:
    fwd_name = f"graphs/tile{spec.id}_forward_kept.onnx"
    bwd_name = f"graphs/tile{spec.id}_backward_kept.onnx"
    graphs[fwd_name], graphs[bwd_name] = forward, backward
    return replace(spec, kept_forward=fwd_name, kept_backward=bwd_name,
                   residuals=tuple(residuals))


def _graph_spec(name: str, graph: GraphAndBackward, graphs: dict[str, onnx.ModelProto],
                ready: int) -> GraphSpec:
    fwd_name, bwd_name = f"graphs/{name}_forward.onnx", f"graphs/{name}_backward.onnx"
    graphs[fwd_name] = graph.model
    backward = graph.backward
    if backward is None:
        return GraphSpec(name, fwd_name, "", tuple(graph.inputs), dict(graph.outputs), {}, {},
                         ready)
    graphs[bwd_name] = backward.model
    return GraphSpec(name, fwd_name, bwd_name, tuple(graph.inputs), dict(graph.outputs),
                     dict(backward.cotangents), dict(backward.gradients), ready)


def _buffers(analysis: Analysis, tiles: int) -> list[BufferSpec]:
    graph, split = analysis.graph, analysis.split
    buffers: list[BufferSpec] = []
    seen: set[str] = set()
    for stage in split.stage_io:
        for name in stage.outputs:
            if name not in seen:
                info = analysis.tensors[name]
                buffers.append(BufferSpec(name, tuple(graph.shape(name)),
                                          graph.dtypes.get(name, 1), "grid", info.stride,
                                          tuple(info.receptive_field), split.layout(name)))
                seen.add(name)
        for reduction in stage.reductions:
            shape = list(graph.shape(reduction.tensor))
            for axis in reduction.rule.axes:
                shape[axis] = 1
            identity = {"ReduceSum": 0.0, "ReduceMax": float("-inf"),
                        "ReduceMin": float("inf")}[reduction.rule.partial]
            buffers.append(BufferSpec(stacked_name(reduction.output), (tiles, *shape),
                                      graph.dtypes.get(reduction.tensor, 1), "partials",
                                      identity=identity))
    for name in split.ready:
        buffers.append(BufferSpec(name, tuple(graph.shape(name)), graph.dtypes.get(name, 1),
                                  "global"))
    return buffers


def _stage_specs(analysis: Analysis, tiles: list[TileSpec], grid_order: bool = False
                 ) -> list[StageSpec]:
    """One spec per stage; ``grid_order``: tiles run in grid (raster) order, as halo reuse
    needs (a tile's strips come from the tiles before it)."""
    def order(k: int) -> list[int]:
        if grid_order:
            return [i for i, t in enumerate(tiles) if t.parts[k] is not None]
        return tile_run_order(tiles, k)

    return [StageSpec(k, tuple(io.inputs), tuple(io.side_inputs), tuple(io.outputs),
                      tuple(stacked_name(r.output) for r in io.reductions), tuple(order(k)))
            for k, io in enumerate(analysis.split.stage_io)]


def _band_buffers(analysis: Analysis, schedule: Schedule, layouts: Layouts) -> list[BufferSpec]:
    """Halo reuse: one buffer per band a tile reads its strips from or hands strips on to (see
    :class:`~streamc.analysis.ownership.Ownership`). A band can be handed on and never read
    (no tile at its index reads a strip of it; ``test_a_band_handed_on_that_no_tile_reads``):
    its buffer is still where the strips go."""
    ownership = schedule.ownership
    if ownership is None:
        return []
    graph, split = analysis.graph, analysis.split
    result: dict[str, BufferSpec] = {}
    for row in layouts.tiles:
        for layout in row:
            if layout is None:
                continue
            for band, (tensor, axis, i) in layout.band_places.items():
                if band in result:
                    continue
                lo, hi = ownership.band(tensor, axis, i)
                shape = list(graph.shape(tensor))
                positions = split.layout(tensor)
                shape[positions[axis]] = hi - lo
                origin = tuple(lo if a == axis else 0 for a in range(len(positions)))
                result[band] = BufferSpec(band, tuple(shape), graph.dtypes.get(tensor, 1),
                                          "band", layout=tuple(positions), origin=origin)
    return list(result.values())


def _export_graph(analysis: Analysis, params: Parameters) -> onnx.ModelProto:
    """The graph ``StreamingModel.export_onnx`` writes: the source model as given (dynamic axes
    kept) when it holds every runtime-owned initializer under its own name, else the prepared
    model at the compiled size; owned initializers become inputs (their values are the
    program's parameters)."""
    source = analysis.source
    if source is not None:
        names = {i.name for i in source.graph.initializer}
        if params.names <= names:
            return model_graph(source, params.names)
    return model_graph(analysis.model, params.names)


def _parameter_specs(analysis: Analysis, params: Parameters) -> list[ParameterSpec]:
    trainable = set(params.trainable)
    inits = {i.name: i for i in analysis.model.graph.initializer}
    return [ParameterSpec(name, tuple(inits[name].dims), inits[name].data_type,
                          name in trainable)
            for name in list(params.trainable) + list(params.buffers)]


def _tied_notes(analysis: Analysis, params: Parameters) -> list[str]:
    return [
        f"the exporter merged initializers of equal value: {', '.join(map(repr, aliases))} "
        f"{'is an Identity' if len(aliases) == 1 else 'are Identities'} of {name!r}, so "
        f"they share one value and train as one parameter; export after the weights differ "
        f"(randomised or trained) to keep them apart."
        for name, aliases in tied_parameters(analysis.source or analysis.model,
                                             params.trainable).items()]


#: Below this share of the model's forward FLOPs streamed, the compile notes say so.
LOW_STREAMED_SHARE = 0.5


def share_notes(analysis: Analysis, share: StreamedShare | None) -> list[str]:
    """A note when streaming buys little: the grid computes a small part of the model."""
    if share is None or share.flops >= LOW_STREAMED_SHARE or analysis.grid_end:
        return []
    stop = analysis.stops[0].sentence() if analysis.stops else "the head"
    return [f"streaming buys little here: only {share.sentence()}; the rest runs on whole "
            f"tensors in the head, whose memory tiling does not reduce. The grid ends at "
            f"{stop}."]


def _memory_plan(s: Mapping[str, Any]) -> MemoryPlan:
    copies = s["optimizer_copies"]
    conventional = s["conventional"] or plan_conventional(s["analysis"], copies)
    return plan_program(s["program"], conventional, policy=s["policy"],
                        optimizer_copies=copies, exact=s["exact"])


def compile_passes(with_flops: bool = True, with_memory_plan: bool = True) -> list[Pass]:
    """The compiler's passes in the order they run (see the module docstring)."""
    passes = [
        Pass("parameters", ("analysis",), "parameters",
             lambda s: model_parameters(s["analysis"]),
             doc="which initializers the runtime owns: trainable weights and buffers"),
        Pass("schedule", ("analysis", "tile", "max_tiles", "halo"), "schedule", _schedule,
             _check_schedule, doc="the tile grid; kept regions partition every target"),
        Pass("layout", ("analysis", "schedule"), "layouts", _layouts, _check_layouts,
             doc="each tile's cone per stage in tile-local numbers, checked exact; classes"),
        Pass("tile graphs", ("analysis", "layouts", "parameters"), "tile_graphs", _tile_graphs,
             _check_tile_graphs, doc="one forward ONNX graph per shape class"),
        Pass("autodiff", ("tile_graphs", "parameters", "analysis", "mode"), "backward_graphs",
             _backward_graphs, _check_backward, doc="the backward graph of each tile graph"),
        Pass("keep", ("backward_graphs", "tile_graphs", "layouts", "schedule", "keep_tiles",
                      "keep_stride", "analysis"),
             "kept", _kept,
             _check_kept, doc="the tiles whose backward reads their forward's activations"),
        Pass("hoist", ("backward_graphs", "kept", "parameters"), "hoisted", _hoisted,
             _check_hoisted,
             doc="the tile backward graphs' weight work, moved into graphs run once per pass"),
        Pass("globals", ("analysis", "parameters", "schedule", "mode"), "globals", _globals,
             doc="the graphs on per-sample values between stages, and their backward"),
        Pass("head", ("analysis", "parameters", "mode"), "head", _head,
             doc="the graph after the grid, and its backward graph"),
        Pass("flops", ("analysis", "layouts", "tile_graphs", "parameters", "mode", "kept"),
             "flops",
             _flops if with_flops else (lambda s: None),
             doc="tiled, untiled and whole-model FLOPs: the recompute overhead"),
        Pass("program", ("analysis", "schedule", "layouts", "parameters", "tile_graphs",
                         "kept", "hoisted", "globals", "head", "flops", "source", "mode",
                         "keep_stride"),
             "program",
             _program, doc="the program: graphs, parameters and its typed description"),
    ]
    if with_memory_plan:
        passes.append(Pass("memory plan", ("program", "analysis", "conventional", "policy",
                                           "exact", "optimizer_copies"),
                           "memory_plan", _memory_plan,
                           doc="peak memory of a training step under the runtime policy"))
    return passes
