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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from streamc._gc import paused_gc
from streamc.analysis import Analysis
from streamc.analysis.analyze import analyze_checked
from streamc.errors import CompileError
from streamc.graph import FLOAT_TYPES, load_model_serialized
from streamc.meta import (
    ClassSpec,
    CutSpec,
    FlopCounts,
    HeadSpec,
    InputSpec,
    ParameterSpec,
    ProgramMeta,
    SourceSpec,
    TileSpec,
    tile_run_order,
)
from streamc.passes.autodiff import BackwardGraph, build_backward
from streamc.passes.extract import (
    Head,
    Parameters,
    extract_head,
    model_graph,
    model_parameters,
    parameter_values,
    tied_parameters,
)
from streamc.passes.flops import backward_flops, count_flops
from streamc.passes.manager import Pass, PassManager
from streamc.passes.memory import ConventionalPlan, MemoryPlan, plan_conventional, plan_program
from streamc.passes.schedule import MAX_TILES, Schedule, Tile, check_schedule, make_schedule
from streamc.passes.tile_graph import TileLayout, emit_tile_graph, layout_tile, verify_layout
from streamc.policy import DEFAULT_POLICY, RuntimePolicy
from streamc.program import Program, file_sha256
from streamc.progress import progress_bar


def compile(
    model: str | Path | onnx.ModelProto,
    tile: int | str | Sequence[int],
    image: Sequence[int] | None = None,
    input: str | None = None,
    with_flops: bool = True,
    with_memory_plan: bool = True,
    policy: RuntimePolicy = DEFAULT_POLICY,
    max_tiles: int = MAX_TILES,
) -> Program:
    """Compile ``model`` into a tiled program for images of size ``image`` ((H, W) or (D, H, W)).

    ``tile`` is the largest input crop per axis (``2048``, ``"2048x1536"`` or a tuple); the
    schedule uses as few tiles as fit it. ``image`` is required when the model's spatial axes
    are dynamic. ``with_flops`` also counts the untiled FLOPs to report recompute overhead;
    ``with_memory_plan`` stores the predicted peak memory under ``policy``
    (``program.memory_plan``). A tile so small that the grid would exceed ``max_tiles`` tiles
    is refused at once.
    """
    with paused_gc():
        started = time.perf_counter()
        proto, serialized = load_model_serialized(model)
        analysis = analyze_checked(proto, image, input)
        return compile_analysis(analysis, tile, source_of(model, serialized),
                                with_flops=with_flops, with_memory_plan=with_memory_plan,
                                policy=policy, max_tiles=max_tiles, started=started)


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
                     started: float | None = None) -> Program:
    """Compile an analysed model (see :func:`compile`)."""
    started = time.perf_counter() if started is None else started
    state = compile_state(analysis, tile, source, with_flops=with_flops,
                          with_memory_plan=with_memory_plan, conventional=conventional,
                          policy=policy, max_tiles=max_tiles)
    program: Program = state["program"]
    program.meta.compile_seconds = round(time.perf_counter() - started, 3)
    return program


def compile_state(analysis: Analysis, tile: int | str | Sequence[int], source: SourceSpec, *,
                  with_flops: bool = True, with_memory_plan: bool = True,
                  conventional: ConventionalPlan | None = None,
                  policy: RuntimePolicy = DEFAULT_POLICY, exact: bool = False,
                  optimizer_copies: int = 2, max_tiles: int = MAX_TILES) -> dict[str, Any]:
    """Run the compiler's passes on ``analysis`` and return their results by name
    (``"program"``, ``"memory_plan"`` ...); the program's description holds the memory plan."""
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
    with paused_gc():
        state: dict[str, Any] = {"analysis": analysis, "tile": tile, "source": source,
                                 "policy": policy, "conventional": conventional,
                                 "exact": exact, "optimizer_copies": optimizer_copies,
                                 "max_tiles": max_tiles}
        PassManager(compile_passes(with_flops, with_memory_plan)).run(state)
    plan = state.get("memory_plan")
    state["program"].meta.memory_plan = plan.to_dict() if plan is not None else None
    return state


# -- the passes -------------------------------------------------------------------------------


@dataclass
class Layouts:
    """Every tile's layout, each tile's shape class, and one layout per class."""

    tiles: list[TileLayout]
    class_of: list[int]
    classes: list[TileLayout]


@dataclass
class HeadGraphs:
    head: Head
    backward: BackwardGraph


def _schedule(s: Mapping[str, Any]) -> Schedule:
    return make_schedule(s["analysis"], s["tile"], s["max_tiles"])


def _check_schedule(s: Mapping[str, Any], schedule: Schedule) -> None:
    check_schedule(s["analysis"], schedule)


def _layouts(s: Mapping[str, Any]) -> Layouts:
    analysis, schedule = s["analysis"], s["schedule"]
    tiles, class_of, classes = [], [], []
    by_signature: dict[tuple, int] = {}
    with progress_bar(len(schedule.tiles), "layout") as tick:
        for tile in schedule.tiles:
            layout = layout_tile(analysis, tile)
            signature = layout.signature()
            if signature not in by_signature:
                by_signature[signature] = len(classes)
                classes.append(layout)
            tiles.append(layout)
            class_of.append(by_signature[signature])
            tick()
    return Layouts(tiles, class_of, classes)


def _check_layouts(s: Mapping[str, Any], layouts: Layouts) -> None:
    """The layout check: every tile's kept regions are exact (docs/architecture.md)."""
    with progress_bar(len(layouts.tiles), "layout check") as tick:
        for tile, layout in zip(s["schedule"].tiles, layouts.tiles):
            verify_layout(s["analysis"], tile, layout)
            tick()


def _tile_graphs(s: Mapping[str, Any]) -> list[onnx.ModelProto]:
    names = s["parameters"].names
    return [emit_tile_graph(s["analysis"], layout, names, name=f"tile{k}_forward")
            for k, layout in enumerate(s["layouts"].classes)]


def _check_tile_graphs(s: Mapping[str, Any], graphs: list[onnx.ModelProto]) -> None:
    for k, (graph, layout) in enumerate(zip(graphs, s["layouts"].classes)):
        if len(graph.graph.output) != len(layout.outputs):
            raise CompileError(f"internal error: tile class {k} has {len(graph.graph.output)} "
                               f"outputs for {len(layout.outputs)} kept cut tensors.")


def _backward_graphs(s: Mapping[str, Any]) -> list[BackwardGraph]:
    trainable = set(s["parameters"].trainable)
    result = []
    with progress_bar(len(s["tile_graphs"]), "autodiff", unit="class") as tick:
        for k, forward in enumerate(s["tile_graphs"]):
            inputs = [i.name for i in forward.graph.input]
            result.append(build_backward(forward, wrt=[n for n in inputs if n in trainable],
                                         outputs=[o.name for o in forward.graph.output],
                                         name=f"tile{k}_backward"))
            tick()
    return result


def _check_backward(s: Mapping[str, Any], graphs: list[BackwardGraph]) -> None:
    trainable = set(s["parameters"].trainable)
    for k, (forward, backward) in enumerate(zip(s["tile_graphs"], graphs)):
        wanted = {i.name for i in forward.graph.input if i.name in trainable}
        outputs = {o.name for o in forward.graph.output}
        if set(backward.gradients) != wanted or set(backward.cotangents) != outputs:
            raise CompileError(f"internal error: the backward graph of tile class {k} does not "
                               "take one cotangent per output and give one gradient per weight.")


def _head(s: Mapping[str, Any]) -> HeadGraphs:
    params: Parameters = s["parameters"]
    head = extract_head(s["analysis"], params.names)
    trainable = set(params.trainable)
    wrt = list(head.inputs) + [i.name for i in head.model.graph.input if i.name in trainable]
    floats = [o.name for o in head.model.graph.output
              if o.type.tensor_type.elem_type in FLOAT_TYPES]
    return HeadGraphs(head, build_backward(head.model, wrt=wrt, outputs=floats,
                                           name="head_backward"))


def _flops(s: Mapping[str, Any]) -> FlopCounts:
    """Tiled and untiled FLOPs, forward and backward: the recompute overhead of tiling.

    The untiled figures come from the same pass run on one tile that covers the whole image,
    so both sides are counted by the same table on the same kind of graph.
    """
    analysis, layouts = s["analysis"], s["layouts"]
    params: Parameters = s["parameters"]
    trainable = set(params.trainable)
    per_class = []
    for forward in s["tile_graphs"]:
        wrt = {i.name for i in forward.graph.input if i.name in trainable}
        per_class.append((count_flops(forward), backward_flops(forward, wrt)))
    whole = layout_tile(analysis, _whole_image_tile(analysis))
    untiled = emit_tile_graph(analysis, whole, params.names, name="untiled_forward")
    untiled_wrt = {i.name for i in untiled.graph.input if i.name in trainable}
    return FlopCounts(
        untiled_forward=count_flops(untiled),
        untiled_backward=backward_flops(untiled, untiled_wrt),
        tiled_forward=sum(per_class[k][0] for k in layouts.class_of),
        tiled_backward=sum(per_class[k][1] for k in layouts.class_of),
    )


def _whole_image_tile(analysis: Analysis) -> Tile:
    kept = {c: tuple((0, n) for n in analysis.extent(c)) for c in analysis.cut_tensors}
    crop = tuple((0, n) for n in analysis.image_size)
    return Tile((0,) * analysis.n_spatial, kept, crop)


def _program(s: Mapping[str, Any]) -> Program:
    analysis: Analysis = s["analysis"]
    schedule: Schedule = s["schedule"]
    layouts: Layouts = s["layouts"]
    params: Parameters = s["parameters"]
    graphs: dict[str, onnx.ModelProto] = {}
    classes = []
    for k, (layout, forward, backward) in enumerate(zip(layouts.classes, s["tile_graphs"],
                                                        s["backward_graphs"])):
        fwd_name, bwd_name = f"graphs/tile{k}_forward.onnx", f"graphs/tile{k}_backward.onnx"
        graphs[fwd_name], graphs[bwd_name] = forward, backward.model
        outputs = [o.name for o in forward.graph.output]
        cut_of = {name: cut for (cut, _), name in zip(layout.outputs, outputs)}
        inputs = [i.name for i in forward.graph.input]
        classes.append(ClassSpec(
            id=k, forward=fwd_name, backward=bwd_name, input_size=tuple(layout.input_size),
            outputs={cut_of[o]: o for o in outputs},
            cotangents={cut_of[o]: c for o, c in backward.cotangents.items()},
            gradients=dict(backward.gradients),
            parameters=tuple(n for n in inputs if n in params.names)))
    tiles = [TileSpec(tuple(t.index), layouts.class_of[i], tuple(t.crop), dict(t.kept))
             for i, t in enumerate(schedule.tiles)]
    head: HeadGraphs = s["head"]
    graphs["graphs/head_forward.onnx"] = head.head.model
    graphs["graphs/head_backward.onnx"] = head.backward.model
    graphs["graphs/model.onnx"] = _export_graph(analysis, params)
    meta = ProgramMeta(
        source=s["source"],
        input=InputSpec(analysis.input_name, tuple(analysis.image_shape),
                        analysis.graph.dtypes.get(analysis.input_name, 1)),
        image_size=tuple(analysis.image_size),
        requested_tile=tuple(schedule.requested_tile),
        tile=tuple(schedule.tile),
        alignment=tuple(schedule.alignment),
        boundaries=tuple(tuple(b) for b in schedule.boundaries),
        notes=list(schedule.notes) + _tied_notes(analysis, params),
        cut_tensors=[CutSpec(c, tuple(analysis.graph.shape(c)), analysis.tensors[c].stride,
                             tuple(analysis.tensors[c].receptive_field))
                     for c in analysis.cut_tensors],
        parameters=_parameter_specs(analysis, params),
        classes=classes,
        tiles=tiles,
        run_order=tile_run_order(tiles),
        head=HeadSpec("graphs/head_forward.onnx", "graphs/head_backward.onnx",
                      tuple(head.head.inputs), dict(head.head.outputs),
                      dict(head.backward.cotangents), dict(head.backward.gradients)),
        outputs=list(analysis.graph.outputs),
        model="graphs/model.onnx",
        flops=s["flops"],
    )
    return Program(meta, graphs, parameter_values(analysis.graph.constants, params.names))


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
        for name, aliases in tied_parameters(analysis.model, params.trainable).items()]


def _memory_plan(s: Mapping[str, Any]) -> MemoryPlan:
    copies = s["optimizer_copies"]
    conventional = s["conventional"] or plan_conventional(s["analysis"], copies)
    return plan_program(s["program"], conventional, policy=s["policy"],
                        optimizer_copies=copies, exact=s["exact"])


def compile_passes(with_flops: bool = True, with_memory_plan: bool = True) -> list[Pass]:
    """The compiler's passes in the order they run (see the module docstring)."""
    passes = [
        Pass("parameters", ("analysis",), "parameters",
             lambda s: model_parameters(s["analysis"].model),
             doc="which initializers the runtime owns: trainable weights and buffers"),
        Pass("schedule", ("analysis", "tile", "max_tiles"), "schedule", _schedule,
             _check_schedule,
             doc="the tile grid; kept regions partition every cut tensor"),
        Pass("layout", ("analysis", "schedule"), "layouts", _layouts, _check_layouts,
             doc="each tile's cone in tile-local numbers, checked exact; shape classes"),
        Pass("tile graphs", ("analysis", "layouts", "parameters"), "tile_graphs", _tile_graphs,
             _check_tile_graphs, doc="one forward ONNX graph per shape class"),
        Pass("autodiff", ("tile_graphs", "parameters"), "backward_graphs", _backward_graphs,
             _check_backward, doc="the backward graph of each tile graph"),
        Pass("head", ("analysis", "parameters"), "head", _head,
             doc="the graph after the cut, and its backward graph"),
        Pass("flops", ("analysis", "layouts", "tile_graphs", "parameters"), "flops",
             _flops if with_flops else (lambda s: None),
             doc="tiled and untiled FLOPs: the recompute overhead"),
        Pass("program", ("analysis", "schedule", "layouts", "parameters", "tile_graphs",
                         "backward_graphs", "head", "flops", "source"), "program", _program,
             doc="the program: graphs, parameters and its typed description"),
    ]
    if with_memory_plan:
        passes.append(Pass("memory plan", ("program", "analysis", "conventional", "policy",
                                           "exact", "optimizer_copies"),
                           "memory_plan", _memory_plan,
                           doc="peak memory of a training step under the runtime policy"))
    return passes
