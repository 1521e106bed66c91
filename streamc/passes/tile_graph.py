"""Tile-graph pass: the prefix, trimmed to one tile's cone, as a standalone ONNX graph.

Contract: :func:`layout_tile` turns a scheduled tile into a :class:`TileLayout` — for every
prefix node, the slices it takes of its inputs (in tile-local coordinates), the padding it uses
on this tile (genuine padding only at the true image border) and the slice it keeps of its
output. Every intermediate tensor is computed over exactly the region its consumers need
("trim to the cone", DESIGN section 5), so there is no garbage border. Tiles with equal layouts
share one graph (:meth:`TileLayout.signature`). :func:`verify_layout` re-derives, from the
layout's local numbers alone, which positions of each tensor equal their full-image values, and
refuses a layout whose kept regions are not all exact (DESIGN section 4).
:func:`emit_tile_graph` writes the layout as an ONNX model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from streamc.analysis import Analysis
from streamc.analysis.regions import Box, clip, union
from streamc.errors import CompileError
from streamc.graph import set_attribute
from streamc.ops.axis import Interval, Transposed, Upsample, Window
from streamc.passes.schedule import Tile

Local = tuple[tuple[int, int], ...]  # half-open local intervals, one per spatial axis


@dataclass(frozen=True)
class NodeLayout:
    """How one prefix node runs on a tile (all numbers tile-local)."""

    node: str
    input_slices: tuple[tuple[int, Local | None], ...]  # (slot, slice of the input or None)
    pads: tuple[tuple[int, int], ...] | None = None  # window / pad kinds
    output_padding: tuple[int, ...] | None = None  # transposed kind
    output_slice: Local | None = None  # resize / transposed kinds


@dataclass
class TileLayout:
    """One tile's graph in tile-local numbers, plus the full-image regions it was made from."""

    input_size: tuple[int, ...]
    nodes: tuple[NodeLayout, ...]
    outputs: tuple[tuple[str, Local | None], ...]  # (cut tensor, slice of its kept region)
    regions: dict[str, Box] = field(default_factory=dict, compare=False)

    def signature(self) -> tuple:
        return (self.input_size, self.nodes, self.outputs)


def _local(box: Box, within: Box) -> Local | None:
    """``box`` in coordinates local to ``within``; None when they are equal."""
    if tuple(box) == tuple(within):
        return None
    return tuple((a - w0, b - w0) for (a, b), (w0, _w1) in zip(box, within))


def layout_tile(analysis: Analysis, tile: Tile) -> TileLayout:
    """The layout of ``tile`` (see module docstring)."""
    graph = analysis.graph
    regions = analysis.regions_for(tile.kept, runnable=True)
    nodes = []
    for name in analysis.prefix:
        node = graph.nodes[name]
        op = analysis.split.local_ops[name]
        out_box = None
        for out in node.output:
            out_box = union(out_box, regions.get(out))
        if out_box is None:
            continue
        for out in node.output:
            if out:
                regions[out] = out_box
        slices = []
        needs: list[Box] = []
        for slot in op.grid_inputs:
            tensor = node.input[slot]
            need = clip(tuple(ax.reads(iv) for ax, iv in zip(op.axes, out_box)),
                        analysis.extent(tensor))
            slices.append((slot, _local(need, regions[tensor])))
            needs.append(need)
        pads = output_padding = output_slice = None
        if op.kind in ("window", "pad"):
            pads = tuple(ax.tile_pads(iv, nv) for ax, iv, nv in zip(op.axes, out_box, needs[0]))
        elif op.kind == "resize":
            produced = tuple(
                ax.produces(nv) if isinstance(ax, Upsample) else nv
                for ax, nv in zip(op.axes, needs[0])
            )
            output_slice = _local(out_box, produced)
        elif op.kind == "transposed":
            pads_list, op_list = [], []
            for ax, iv, nv in zip(op.axes, out_box, needs[0]):
                p_begin, p_end, extra = _transposed_pads(ax, iv, nv)
                pads_list.append((p_begin, p_end))
                op_list.append(extra)
            pads, output_padding = tuple(pads_list), tuple(op_list)
        nodes.append(NodeLayout(name, tuple(slices), pads, output_padding, output_slice))
    outputs = tuple(
        (cut, _local(tile.kept[cut], regions[cut]))
        for cut in analysis.cut_tensors if cut in tile.kept
    )
    crop = regions[analysis.input_name]
    return TileLayout(tuple(b - a for a, b in crop), tuple(nodes), outputs, regions)


def _transposed_pads(ax: Transposed, out: Interval, available: Interval) -> tuple[int, int, int]:
    """Pads and output_padding for a ConvTranspose on ``available`` to yield exactly ``out``."""
    start, stop = ax.produces(available)
    p_begin = out[0] - start
    p_end = stop - out[1]
    extra = 0
    if p_end < 0:
        extra, p_end = -p_end, 0
    if p_begin < 0:
        raise CompileError("internal error: a transposed convolution tile starts too late.")
    return p_begin, p_end, extra


# --- verification (DESIGN section 4) ------------------------------------------------------------


@dataclass
class _Known:
    origin: tuple[int, ...]  # full-image position of local index 0
    size: tuple[int, ...]
    valid: Box  # full-image positions whose values are exact


def _intersect(a: Interval, b: Interval) -> Interval:
    return (max(a[0], b[0]), min(a[1], b[1]))


def _window_valid(ax: Window, origin: int, size: int, pads: tuple[int, int], valid: Interval,
                  extent: int, pad_begin: int) -> tuple[int, int, Interval]:
    p_b, p_e = pads
    count = (size + p_b + p_e - ax.span) // ax.stride + 1
    first = origin - p_b + pad_begin
    if first % ax.stride:
        raise CompileError(
            f"tile origin {origin} is not aligned with a stride-{ax.stride} window; the tile "
            "grid must lie on the network's alignment lattice."
        )
    j0 = first // ax.stride
    lo, hi = j0, j0 + count
    if valid[0] > 0:
        lo = max(lo, -((-(valid[0] + pad_begin)) // ax.stride))
    if valid[1] < extent:
        hi = min(hi, (valid[1] - ax.span + pad_begin) // ax.stride + 1)
    return j0, count, (lo, max(lo, hi))


def verify_layout(analysis: Analysis, tile: Tile, layout: TileLayout) -> None:
    """Check, from the layout's local numbers, that every kept region is exact; raise otherwise."""
    graph = analysis.graph
    crop = tile.crop
    known: dict[str, _Known] = {
        analysis.input_name: _Known(tuple(a for a, _ in crop), layout.input_size, crop)
    }
    for spec in layout.nodes:
        node = graph.nodes[spec.node]
        op = analysis.split.local_ops[spec.node]
        inputs = []
        for slot, local in spec.input_slices:
            k = known[node.input[slot]]
            if local is not None:
                origin = tuple(o + a for o, (a, _) in zip(k.origin, local))
                size = tuple(b - a for a, b in local)
                box = tuple((o, o + s) for o, s in zip(origin, size))
                k = _Known(origin, size, tuple(_intersect(v, b) for v, b in zip(k.valid, box)))
            inputs.append((node.input[slot], k))
        origin, size, valid = [], [], []
        for axis, ax in enumerate(op.axes):
            tensor, k = inputs[0]
            extent = analysis.extent(tensor)[axis]
            o, n, v = k.origin[axis], k.size[axis], k.valid[axis]
            if op.kind in ("window", "pad") or (op.kind == "pointwise"):
                pads = spec.pads[axis] if spec.pads is not None else (0, 0)
                j0, count, vv = _window_valid(ax, o, n, pads, v, extent, ax.pad_begin)
                for _other, ko in inputs[1:]:
                    if (ko.origin[axis], ko.size[axis]) != (o, n):
                        raise CompileError(
                            f"node {spec.node!r}: its grid inputs cover different regions on "
                            "this tile."
                        )
                    vv = _intersect(vv, ko.valid[axis])
            elif op.kind == "resize":
                f = ax.factor if isinstance(ax, Upsample) else 1
                j0, count, vv = o * f, n * f, (v[0] * f, v[1] * f)
            else:  # transposed
                p_b, p_e = spec.pads[axis]
                extra = spec.output_padding[axis]
                j0 = o * ax.stride - ax.pad_begin + p_b
                count = ax.stride * (n - 1) + extra + ax.span - p_b - p_e
                lo = j0 if v[0] == 0 else max(j0, (v[0] - 1) * ax.stride - ax.pad_begin + ax.span)
                hi = j0 + count if v[1] == extent else min(
                    j0 + count, v[1] * ax.stride - ax.pad_begin)
                vv = (lo, max(lo, hi))
            if spec.output_slice is not None:
                a, b = spec.output_slice[axis]
                j0, count = j0 + a, b - a
            vv = _intersect(vv, (j0, j0 + count))
            origin.append(j0)
            size.append(count)
            valid.append(vv)
        result = _Known(tuple(origin), tuple(size), tuple(valid))
        for out in node.output:
            if not out:
                continue
            claimed = layout.regions[out]
            if tuple((o, o + s) for o, s in zip(result.origin, result.size)) != tuple(claimed):
                raise CompileError(
                    f"tile {tile.index}: node {spec.node!r} ({node.op_type}) would compute "
                    f"region {result.origin}+{result.size} of {out!r}, not the planned "
                    f"{claimed}; refusing to emit an inexact program."
                )
            known[out] = result
    for cut, kept in tile.kept.items():
        k = known[cut]
        if not all(v[0] <= a and b <= v[1] for (a, b), v in zip(kept, k.valid)):
            raise CompileError(
                f"tile {tile.index}: the kept region {kept} of cut tensor {cut!r} is not inside "
                f"the region {k.valid} that the tile computes exactly; refusing to emit an "
                "inexact program."
            )


# --- emission -----------------------------------------------------------------------------------


class _Builder:
    def __init__(self, prefix: str) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: dict[str, onnx.TensorProto] = {}
        self._constants: dict[tuple, str] = {}
        self._count = 0
        self.prefix = prefix

    def fresh(self, base: str) -> str:
        self._count += 1
        return f"{base}__t{self._count}"

    def ints(self, values) -> str:
        key = ("i64", tuple(int(v) for v in values))
        if key not in self._constants:
            name = f"{self.prefix}const_{len(self._constants)}"
            self.initializers[name] = numpy_helper.from_array(
                np.array(key[1], dtype=np.int64), name)
            self._constants[key] = name
        return self._constants[key]

    def slice(self, tensor: str, local: Local, first_axis: int = 2) -> str:
        out = self.fresh(tensor)
        axes = list(range(first_axis, first_axis + len(local)))
        self.nodes.append(helper.make_node(
            "Slice",
            [tensor, self.ints([a for a, _ in local]), self.ints([b for _, b in local]),
             self.ints(axes)],
            [out], name=self.fresh("slice"),
        ))
        return out


def emit_tile_graph(
    analysis: Analysis,
    layout: TileLayout,
    parameters: set[str],
    name: str = "tile",
    output_names: dict[str, str] | None = None,
) -> onnx.ModelProto:
    """Write ``layout`` as an ONNX model.

    Inputs: the image crop (named like the model's image input), then every initializer in
    ``parameters`` that the tile reads (as graph inputs, fed by the runtime). Other initializers
    stay initializers. Outputs: the kept region of each cut tensor, named by ``output_names``
    (default: :func:`kept_name` of the cut tensor).
    """
    graph = analysis.graph
    model = analysis.model
    builder = _Builder(f"{name}_")
    n_spatial = analysis.n_spatial
    image = analysis.input_name
    for spec in layout.nodes:
        node = graph.nodes[spec.node]
        op = analysis.split.local_ops[spec.node]
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        for slot, local in spec.input_slices:
            if local is not None:
                copy.input[slot] = builder.slice(node.input[slot], local)
        if op.kind == "window":
            set_attribute(copy, "auto_pad", None)
            ends = [p for _, p in spec.pads]
            if any(getattr(ax, "ceil_mode", False) for ax in op.axes):
                # A ceil_mode overhang (the last window reaching past the end padding, by less
                # than a stride) stays ceil_mode's: written as padding it can reach the kernel
                # size, which ONNX Runtime refuses. The tile's exact pads keep their output
                # count under ceil_mode, since their padded length is a whole number of strides.
                ends = [min(p, ax.pad_end) for p, ax in zip(ends, op.axes)]
            set_attribute(copy, "pads", [p for p, _ in spec.pads] + ends)
        elif op.kind == "pad":
            rank = n_spatial + 2
            pads = list(op.attrs["pads"])
            for axis, (p_b, p_e) in enumerate(spec.pads):
                pads[2 + axis], pads[2 + axis + rank] = p_b, p_e
            if graph.opset < 11:
                set_attribute(copy, "pads", pads)
            else:
                del copy.input[3:]
                copy.input[1] = builder.ints(pads)
        elif op.kind == "transposed":
            set_attribute(copy, "auto_pad", None)
            set_attribute(copy, "pads", [p for p, _ in spec.pads] + [p for _, p in spec.pads])
            set_attribute(copy, "output_padding", list(spec.output_padding))
        elif op.kind == "resize" and graph.opset >= 11 and len(copy.input) > 3 and copy.input[3]:
            # Sizes are full-image sizes: switch to the (integer) scales instead.
            scales = [1.0, 1.0] + [float(getattr(ax, "factor", 1)) for ax in op.axes]
            scale_name = builder.fresh("scales")
            builder.initializers[scale_name] = numpy_helper.from_array(
                np.array(scales, dtype=np.float32), scale_name)
            copy.input[2] = scale_name
            del copy.input[3:]
        if spec.output_slice is not None:
            produced = builder.fresh(copy.output[0])
            final = copy.output[0]
            copy.output[0] = produced
            builder.nodes.append(copy)
            builder.nodes.append(helper.make_node(
                "Slice",
                [produced, builder.ints([a for a, _ in spec.output_slice]),
                 builder.ints([b for _, b in spec.output_slice]),
                 builder.ints(list(range(2, 2 + n_spatial)))],
                [final], name=builder.fresh("slice"),
            ))
        else:
            builder.nodes.append(copy)
    outputs = []
    for cut, local in layout.outputs:
        out_name = kept_name(cut) if output_names is None else output_names[cut]
        if local is not None:
            source = builder.slice(cut, local)
            _rename(builder.nodes, source, out_name)
        elif cut != image and not _identity_output_is_safe(builder.nodes, cut):
            # The whole computed region is kept: give the tensor the output's name instead of
            # adding an Identity. ONNX Runtime 1.32 (EliminateIdentity with Pad fusion) rejects
            # a graph where a tensor feeds both an output Identity and a Pad before a Conv.
            _rename(builder.nodes, cut, out_name)
        else:
            # The image, or a tensor other nodes of the tile also read: ORT 1.32's
            # ConvAddActivationFusion fuses a Conv into a following Add and activation even
            # when the Conv's output is a graph output, and the session then fails to load.
            builder.nodes.append(helper.make_node("Identity", [cut], [out_name],
                                                  name=builder.fresh("out")))
        outputs.append(out_name)
    nodes = _with_constant_nodes(analysis, builder.nodes)
    used = {i for n in nodes for i in n.input if i}
    inits = {i.name: i for i in model.graph.initializer}
    image_vi = next(v for v in model.graph.input if v.name == image)
    image_shape = [d.dim_value for d in image_vi.type.tensor_type.shape.dim][:2]
    inputs = [helper.make_tensor_value_info(
        image, image_vi.type.tensor_type.elem_type, image_shape + list(layout.input_size))]
    for pname in sorted(p for p in parameters if p in used):
        t = inits[pname]
        inputs.append(helper.make_tensor_value_info(pname, t.data_type, list(t.dims)))
    initializers = [t for n, t in inits.items() if n in used and n not in parameters]
    initializers += [t for n, t in builder.initializers.items() if n in used]
    out_vis = [helper.make_tensor_value_info(o, onnx.TensorProto.UNDEFINED, None)
               for o in outputs]
    g = helper.make_graph(nodes, name, inputs, out_vis, initializers)
    proto = helper.make_model(g, opset_imports=list(model.opset_import),
                              producer_name="streamc")
    proto.ir_version = model.ir_version
    return _typed_outputs(proto)


def _identity_output_is_safe(nodes: list[onnx.NodeProto], tensor: str) -> bool:
    """Whether ``tensor`` may reach a graph output through an Identity: it is read by other
    nodes (so renaming it would make it a graph output with consumers, which ORT's
    Conv-Add-activation fusion mishandles), and none of them is a Pad (see the caller)."""
    readers = [n for n in nodes if tensor in n.input]
    return bool(readers) and not any(n.op_type == "Pad" for n in readers)


def _rename(nodes: list[onnx.NodeProto], old: str, new: str) -> None:
    """Rename tensor ``old`` to ``new`` wherever ``nodes`` produce or read it."""
    for node in nodes:
        for i, name in enumerate(node.output):
            if name == old:
                node.output[i] = new
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new


def _with_constant_nodes(analysis: Analysis, nodes: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
    """Prepend the image-independent nodes (computed weights, ...) that ``nodes`` read."""
    graph = analysis.graph
    needed = {i for n in nodes for i in n.input if i}
    chosen = []
    for name in reversed(analysis.split.constant_nodes):
        node = graph.nodes[name]
        if any(o in needed for o in node.output):
            chosen.append(node)
            needed.update(i for i in node.input if i)
    return list(reversed(chosen)) + nodes


def _typed_outputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """Fill output types/shapes by shape inference (outputs were declared untyped)."""
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    shapes = {vi.name: vi for vi in list(inferred.graph.value_info) + list(inferred.graph.output)}
    outputs = [shapes.get(o.name, o) for o in model.graph.output]
    del inferred.graph.output[:]
    inferred.graph.output.extend(outputs)
    del inferred.graph.value_info[:]
    return inferred


def kept_name(cut: str) -> str:
    """Name of a tile graph's output that holds the kept region of cut tensor ``cut``."""
    return f"{cut}:kept"
