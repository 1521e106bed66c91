"""``streamc.compile``: model + image size + tile size -> an exact tiled training program.

The driver runs the passes in order — analysis, schedule, tile layouts (verified), tile graphs per
shape class, autodiff of each, head extraction and its autodiff, FLOP accounting — and packs the
result into a :class:`~streamc.program.Program`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import onnx

from streamc._gc import paused_gc
from streamc.analysis import Analysis
from streamc.analysis.analyze import analyze_checked
from streamc.errors import CompileError
from streamc.graph import load_model_serialized
from streamc.passes.autodiff import build_backward
from streamc.passes.extract import (
    extract_head,
    model_graph,
    model_parameters,
    parameter_values,
    tied_parameters,
)
from streamc.passes.flops import backward_flops, count_flops
from streamc.passes.memory_plan import plan_conventional, plan_program
from streamc.passes.schedule import Tile, make_schedule
from streamc.passes.tile_graph import TileLayout, emit_tile_graph, layout_tile, verify_layout
from streamc.program import FORMAT, FORMAT_VERSION, Program, file_sha256


def _json_stride(s: Fraction) -> int | str:
    return s.numerator if s.denominator == 1 else f"{s.numerator}/{s.denominator}"


def _box_json(box) -> list[list[int]]:
    return [[int(a), int(b)] for a, b in box]


def _whole_image_tile(analysis: Analysis) -> Tile:
    kept = {c: tuple((0, n) for n in analysis.extent(c)) for c in analysis.cut_tensors}
    crop = tuple((0, n) for n in analysis.image_size)
    return Tile((0,) * analysis.n_spatial, kept, crop)


def compile(
    model: str | Path | onnx.ModelProto,
    tile: int | str | Sequence[int],
    image: Sequence[int] | None = None,
    input: str | None = None,
    with_flops: bool = True,
    with_memory_plan: bool = True,
) -> Program:
    """Compile ``model`` into a tiled program for images of size ``image`` ((H, W) or (D, H, W)).

    ``tile`` is the largest input crop per axis (``2048``, ``"2048x1536"`` or a tuple); the
    schedule uses as few tiles as fit it. ``image`` is required when the model's spatial axes
    are dynamic. ``with_flops`` also counts the untiled FLOPs to report recompute overhead;
    ``with_memory_plan`` stores the predicted peak memory (``program.memory_plan``).
    """
    with paused_gc():
        return _compile(model, tile, image, input, with_flops, with_memory_plan)


def _compile(model: str | Path | onnx.ModelProto, tile: int | str | Sequence[int],
             image: Sequence[int] | None, input: str | None, with_flops: bool,
             with_memory_plan: bool) -> Program:
    started = time.perf_counter()
    proto, serialized = load_model_serialized(model)
    analysis = analyze_checked(proto, image, input)
    if any(s is None for s in analysis.image_size):
        raise CompileError(
            "the model's spatial size is dynamic: pass the image size (--image HxW, or "
            "image=(H, W) in Python) to compile."
        )
    schedule = make_schedule(analysis, tile)
    params = model_parameters(analysis.model)
    param_names = params.names
    trainable = set(params.trainable)

    classes: list[dict] = []
    graphs: dict[str, onnx.ModelProto] = {}
    by_signature: dict[tuple, int] = {}
    tiles_meta = []
    for tile_ in schedule.tiles:
        layout = layout_tile(analysis, tile_)
        verify_layout(analysis, tile_, layout)
        signature = layout.signature()
        if signature not in by_signature:
            k = len(classes)
            by_signature[signature] = k
            classes.append(_emit_class(analysis, layout, k, param_names, trainable, graphs))
        tiles_meta.append({
            "index": list(tile_.index),
            "class": by_signature[signature],
            "crop": _box_json(tile_.crop),
            "kept": {c: _box_json(b) for c, b in tile_.kept.items()},
        })

    head = extract_head(analysis, param_names)
    graphs["graphs/head_forward.onnx"] = head.model
    head_params = [i.name for i in head.model.graph.input if i.name in trainable]
    float_outputs = [o for o in head.model.graph.output
                     if o.type.tensor_type.elem_type in (onnx.TensorProto.FLOAT,
                                                         onnx.TensorProto.DOUBLE)]
    head_bwd = build_backward(head.model, wrt=list(head.inputs) + head_params,
                              outputs=[o.name for o in float_outputs], name="head_backward")
    graphs["graphs/head_backward.onnx"] = head_bwd.model
    graphs["graphs/model.onnx"] = model_graph(analysis.model, param_names)

    tile_classes = [t["class"] for t in tiles_meta]
    flops = _flops(analysis, tile_classes, classes, graphs, param_names, trainable) \
        if with_flops else {}

    source = {"path": None, "sha256": None}
    if not isinstance(model, onnx.ModelProto):
        source = {"path": str(Path(model).resolve()), "sha256": file_sha256(model)}
    else:
        import hashlib

        source["sha256"] = hashlib.sha256(serialized).hexdigest()
    inits = {i.name: i for i in analysis.model.graph.initializer}
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "source": source,
        "input": {
            "name": analysis.input_name,
            "shape": list(analysis.image_shape),
            "elem_type": analysis.graph.dtypes.get(analysis.input_name, 1),
        },
        "image_size": list(analysis.image_size),
        "requested_tile": list(schedule.requested_tile),
        "tile": list(schedule.tile),
        "alignment": list(schedule.alignment),
        "grid": list(schedule.grid),
        "boundaries": [list(b) for b in schedule.boundaries],
        "notes": schedule.notes + [
            f"the exporter merged initializers of equal value: {', '.join(map(repr, aliases))} "
            f"{'is an Identity' if len(aliases) == 1 else 'are Identities'} of {name!r}, so "
            f"they share one value and train as one parameter; export after the weights differ "
            f"(randomised or trained) to keep them apart."
            for name, aliases in tied_parameters(analysis.model, params.trainable).items()],
        "cut_tensors": [
            {
                "name": c,
                "shape": list(analysis.graph.shape(c)),
                "stride": [_json_stride(s) for s in analysis.tensors[c].stride],
                "receptive_field": list(analysis.tensors[c].receptive_field),
            }
            for c in analysis.cut_tensors
        ],
        "parameters": [
            {
                "name": name,
                "shape": list(inits[name].dims),
                "elem_type": inits[name].data_type,
                "trainable": name in trainable,
            }
            for name in list(params.trainable) + list(params.buffers)
        ],
        "classes": classes,
        "tiles": tiles_meta,
        "head": {
            "forward": "graphs/head_forward.onnx",
            "backward": "graphs/head_backward.onnx",
            "inputs": head.inputs,
            "outputs": head.outputs,
            "cotangents": head_bwd.cotangents,
            "gradients": head_bwd.gradients,
        },
        "outputs": list(analysis.graph.outputs),
        "model": "graphs/model.onnx",
        "flops": flops,
    }
    program = Program(meta, graphs, parameter_values(analysis.graph.constants, param_names))
    if with_memory_plan:
        plan = plan_program(program, plan_conventional(analysis))
        program.meta["memory_plan"] = plan.to_dict()
    program.meta["compile_seconds"] = round(time.perf_counter() - started, 3)
    return program


def _emit_class(analysis: Analysis, layout: TileLayout, k: int, param_names: set[str],
                trainable: set[str], graphs: dict[str, onnx.ModelProto]) -> dict:
    forward = emit_tile_graph(analysis, layout, param_names, name=f"tile{k}_forward")
    inputs = [i.name for i in forward.graph.input]
    wrt = [n for n in inputs if n in trainable]
    outputs = [o.name for o in forward.graph.output]
    backward = build_backward(forward, wrt=wrt, outputs=outputs, name=f"tile{k}_backward")
    fwd_name, bwd_name = f"graphs/tile{k}_forward.onnx", f"graphs/tile{k}_backward.onnx"
    graphs[fwd_name] = forward
    graphs[bwd_name] = backward.model
    cut_of_output = {name: cut for (cut, _), name in zip(layout.outputs, outputs)}
    return {
        "id": k,
        "forward": fwd_name,
        "backward": bwd_name,
        "input_size": list(layout.input_size),
        "outputs": {cut_of_output[o]: o for o in outputs},
        "cotangents": {cut_of_output[o]: name for o, name in backward.cotangents.items()},
        "gradients": backward.gradients,
        "parameters": [n for n in inputs if n in param_names],
    }


def _flops(analysis: Analysis, tile_classes: list[int], classes: list[dict],
           graphs: dict[str, onnx.ModelProto], param_names: set[str], trainable: set[str]) -> dict:
    """Tiled over untiled FLOPs, forward and backward: the recompute overhead of tiling.

    The untiled figures come from the same pass run on one tile that covers the whole image,
    so both sides are counted by the same table on the same kind of graph.
    """
    per_class = []
    for cls in classes:
        forward = graphs[cls["forward"]]
        wrt = {i.name for i in forward.graph.input if i.name in trainable}
        per_class.append((count_flops(forward), backward_flops(forward, wrt)))
    whole_layout = layout_tile(analysis, _whole_image_tile(analysis))
    untiled = emit_tile_graph(analysis, whole_layout, param_names, name="untiled_forward")
    untiled_fwd = count_flops(untiled)
    untiled_bwd = backward_flops(untiled, {i.name for i in untiled.graph.input
                                           if i.name in trainable})
    tiled_fwd = sum(per_class[k][0] for k in tile_classes)
    tiled_bwd = sum(per_class[k][1] for k in tile_classes)
    return {
        "untiled_forward": untiled_fwd,
        "untiled_backward": untiled_bwd,
        "tiled_forward": tiled_fwd,
        "tiled_backward": tiled_bwd,
        "forward_overhead": round(tiled_fwd / max(untiled_fwd, 1), 4),
        "backward_overhead": round(tiled_bwd / max(untiled_bwd, 1), 4),
    }
