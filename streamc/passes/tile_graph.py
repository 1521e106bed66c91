"""Tile-graph pass: the prefix, trimmed to one tile's cone, as a standalone ONNX graph.

Contract: :func:`layout_tile` turns a scheduled tile into a :class:`TileLayout` — for every
prefix node, the slices it takes of its inputs (in tile-local coordinates), the padding it uses
on this tile (genuine padding only at the true image border) and the slice it keeps of its
output. Every intermediate tensor is computed over exactly the region its consumers need
("trim to the cone", docs/architecture.md), so there is no garbage border. Tiles with equal
layouts share one graph (:meth:`TileLayout.signature`). :func:`verify_layout` re-derives, from the
layout's local numbers alone, which positions of each tensor equal their full-image values, and
refuses a layout whose kept regions are not all exact (the layout check, docs/architecture.md).
:func:`emit_tile_graph` writes the layout as an ONNX model.

With halo reuse, :func:`layout_owned` is the layout instead: every node computes its owned
region only; the strips before it come in as graph inputs and are concatenated in front of it;
what later tiles need goes out as graph outputs (:func:`strip_name`, :func:`emit_name`,
:func:`band_name`). :func:`verify_layout` then also requires every owned position to be exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from streamc.analysis import Analysis
from streamc.analysis.ownership import Ownership
from streamc.analysis.regions import Box, clip, contains, is_empty, union
from streamc.errors import CompileError
from streamc.ops.facts import IDENTITY_OUTPUT_UNSAFE_READERS
from streamc.ops.tiling import AxisState, Local, Placement, local_box
from streamc.passes.schedule import Tile


@dataclass(frozen=True)
class NodeLayout:
    """How one prefix node runs on a tile (all numbers tile-local)."""

    node: str
    input_slices: tuple[tuple[int, Local | None], ...]  # (slot, slice of the input or None)
    placement: Placement = Placement()


@dataclass
class TileLayout:
    """One tile's graph for one stage in tile-local numbers, plus the full-image regions it
    was made from.

    ``inputs``: (stage input, size of its crop); ``outputs``: (stage output, slice of its kept
    region); ``partials``: (reduction output, slice of the region of the reduced tensor the tile
    owns).
    """

    stage: int
    inputs: tuple[tuple[str, tuple[int, ...]], ...]
    nodes: tuple[NodeLayout, ...]
    outputs: tuple[tuple[str, Local | None], ...]
    partials: tuple[tuple[str, Local | None], ...] = ()
    #: halo reuse: (graph input, tensor, axis, size) of each strip the tile reads, and
    #: (graph output, tensor, slice) of each part of its owned regions it hands on
    strips: tuple[tuple[str, str, int, tuple[int, ...]], ...] = ()
    emits: tuple[tuple[str, str, Local], ...] = ()
    #: what the tile holds of each tensor (full-image boxes); with halo reuse, strips included
    regions: dict[str, Box] = field(default_factory=dict, compare=False)
    #: halo reuse: the region of each tensor the tile computes (its owned box)
    computed: dict[str, Box] = field(default_factory=dict, compare=False)
    #: halo reuse: graph input or output -> (band buffer, full-image box) on this tile
    bands: dict[str, tuple[str, Box]] = field(default_factory=dict, compare=False)
    #: halo reuse: band buffer -> (tensor, axis, tile index along it) of every band the tile
    #: reads or hands on
    band_places: dict[str, tuple[str, int, int]] = field(default_factory=dict, compare=False)

    @property
    def input_size(self) -> tuple[int, ...]:
        """The size of the first input's crop (the image's, in the first stage)."""
        return self.inputs[0][1]

    def signature(self) -> tuple:
        return (self.stage, self.inputs, self.nodes, self.outputs, self.partials, self.strips,
                self.emits)

    def assembled(self) -> dict[str, list[tuple[str, int]]]:
        """Tensors the tile assembles from strips: tensor -> (graph input, axis) in axis
        order."""
        result: dict[str, list[tuple[str, int]]] = {}
        for name, tensor, axis, _size in self.strips:
            result.setdefault(tensor, []).append((name, axis))
        return result


class HaloReuseUnplaceable(CompileError):
    """Halo reuse cannot place a node on a tile (its windows there read only padding past
    what the tile holds); the compiler then recomputes halos."""


def band_name(tensor: str, axis: int, i: int) -> str:
    """The buffer holding the strips of ``tensor`` read at tile index ``i`` along ``axis``."""
    return f"{tensor}@band{axis}.{i}"


def strip_name(tensor: str, axis: int) -> str:
    """A tile graph's input holding its strip of ``tensor`` before its own start on ``axis``."""
    return f"{tensor}:strip{axis}"


def emit_name(tensor: str, axis: int, ahead: int) -> str:
    """A tile graph's output handing on its part of band ``ahead`` + 1 tiles further along
    ``axis`` of ``tensor``."""
    return f"{tensor}:band{axis}+{ahead}"


def layout_owned(analysis: Analysis, tile: Tile, stage: int, ownership: Ownership
                 ) -> TileLayout:
    """The layout of ``tile`` in ``stage`` under halo reuse: every node computes its owned
    region; a tensor its stage reads before the tile's own start is assembled from strips
    (docs/architecture.md, "Halo reuse")."""
    graph = analysis.graph
    io = analysis.split.stage_io[stage]
    index = tile.index
    crops = tile.crops[stage]
    regions: dict[str, Box] = dict(crops)
    computed: dict[str, Box] = {}
    strips: list[tuple[str, str, int, tuple[int, ...]]] = []
    emits: list[tuple[str, str, Local]] = []
    bands: dict[str, tuple[str, Box]] = {}
    places: dict[str, tuple[str, int, int]] = {}
    needed = _needed_nodes(analysis, stage)
    nodes = []
    for name in io.nodes:
        if name not in needed:
            continue
        node = graph.nodes[name]
        op = analysis.split.local_ops[name]
        out = node.output[0]
        owned = ownership.owned(out, index)
        held = ownership.available(out, index)
        if not is_empty(owned):
            needs: list[Box] = []
            slices = []
            for slot in op.grid_inputs:
                tensor = node.input[slot]
                need = clip(tuple(ax.reads(iv) for ax, iv in zip(op.axes, owned)),
                            analysis.extent(tensor))
                if is_empty(need) or tensor not in regions or not contains(regions[tensor], need):
                    raise HaloReuseUnplaceable(
                        f"halo reuse cannot place node {name!r} ({node.op_type}) on tile "
                        f"{index}: its windows there read {need} of {tensor!r}, past what the "
                        "tile holds (windows that read only padding)")
                slices.append((slot, local_box(need, regions[tensor])))
                needs.append(need)
            placement = op.tiling.layout(op.axes, owned, needs[0])
            nodes.append(NodeLayout(name, tuple(slices), placement))
        for o in node.output:
            if not o:
                continue
            computed[o] = owned
            if is_empty(held):
                continue
            regions[o] = held
            for axis in range(analysis.n_spatial):
                part = _strip_box(owned, held, axis)
                if part is not None:
                    name_ = strip_name(o, axis)
                    strips.append((name_, o, axis, tuple(b - a for a, b in part)))
                    band = band_name(o, axis, index[axis])
                    bands[name_] = (band, part)
                    places[band] = (o, axis, index[axis])
            if not is_empty(owned):
                for name_, band, box, axis, i in _hand_on(ownership, o, index, owned):
                    emits.append((name_, o, local_box(box, held) or _whole(box)))
                    bands[name_] = (band, box)
                    places[band] = (o, axis, i)
    targets = {t: tile.kept[t] for t in io.targets if t in tile.kept}
    outputs = tuple((t, local_box(targets[t], regions[t])) for t in io.outputs if t in targets)
    partials = tuple((r.output, local_box(targets[r.tensor], regions[r.tensor]))
                     for r in io.reductions if r.tensor in targets)
    inputs = tuple((t, tuple(b - a for a, b in crops[t])) for t in io.inputs if t in crops)
    return TileLayout(stage, inputs, tuple(nodes), outputs, partials, tuple(strips),
                      tuple(emits), {**regions}, computed, bands, places)


def _hand_on(ownership: Ownership, tensor: str, index: Sequence[int], owned: Box
             ) -> list[tuple[str, str, Box, int, int]]:
    """(graph output, band buffer, box, axis, tile index along it) of each band of ``tensor``
    that later tiles read and the tile's owned box meets."""
    result = []
    for axis, ax in enumerate(ownership.axes):
        n = len(ax.boundaries[tensor]) - 1
        for i in range(index[axis] + 1, n):
            band = ownership.band(tensor, axis, i)
            if band is None:
                continue
            if band[0] >= owned[axis][1]:
                break
            lo, hi = max(band[0], owned[axis][0]), min(band[1], owned[axis][1])
            if hi > lo:
                box = tuple((lo, hi) if a == axis else iv for a, iv in enumerate(owned))
                result.append((emit_name(tensor, axis, i - index[axis] - 1),
                               band_name(tensor, axis, i), box, axis, i))
    return result


def _whole(box: Box) -> Local:
    return tuple((0, b - a) for a, b in box)


def _strip_box(owned: Box, held: Box, axis: int) -> Box | None:
    """The part of ``held`` before the owned start along ``axis``: owned along the axes
    before it, everything held along the axes after it (docs/architecture.md)."""
    a, b = held[axis][0], owned[axis][0]
    if b <= a:
        return None
    box = tuple(owned[x] if x < axis else (a, b) if x == axis else held[x]
                for x in range(len(owned)))
    return None if is_empty(box) else box


def _needed_nodes(analysis: Analysis, stage: int) -> set[str]:
    """The nodes of ``stage`` its targets depend on."""
    cached = analysis.__dict__.setdefault("_needed_nodes", {})
    if stage not in cached:
        io = analysis.split.stage_io[stage]
        wanted = set(io.targets)
        chosen: set[str] = set()
        graph = analysis.graph
        for name in reversed(io.nodes):
            node = graph.nodes[name]
            if any(o in wanted for o in node.output):
                chosen.add(name)
                op = analysis.split.local_ops[name]
                wanted.update(node.input[slot] for slot in op.grid_inputs)
        cached[stage] = chosen
    return cached[stage]


def layout_tile(analysis: Analysis, tile: Tile, stage: int = 0) -> TileLayout:
    """The layout of ``tile`` in ``stage`` (see module docstring)."""
    graph = analysis.graph
    io = analysis.split.stage_io[stage]
    targets = {t: tile.kept[t] for t in io.targets if t in tile.kept}
    regions = analysis.regions_for(targets, runnable=True, stage=stage)
    nodes = []
    for name in io.nodes:
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
            slices.append((slot, local_box(need, regions[tensor])))
            needs.append(need)
        placement = op.tiling.layout(op.axes, out_box, needs[0])
        nodes.append(NodeLayout(name, tuple(slices), placement))
    outputs = tuple((t, local_box(tile.kept[t], regions[t])) for t in io.outputs
                    if t in tile.kept)
    partials = tuple((r.output, local_box(tile.kept[r.tensor], regions[r.tensor]))
                     for r in io.reductions if r.tensor in tile.kept)
    inputs = tuple((t, tuple(b - a for a, b in regions[t])) for t in io.inputs if t in regions)
    return TileLayout(stage, inputs, tuple(nodes), outputs, partials, regions=regions)


# --- verification -------------------------------------------------------------------------------


@dataclass
class _Known:
    origin: tuple[int, ...]  # full-image position of local index 0
    size: tuple[int, ...]
    valid: Box  # full-image positions whose values are exact

    @classmethod
    def holding(cls, box: Box) -> _Known:
        """A tensor held exactly over ``box``."""
        return cls(tuple(a for a, _ in box), tuple(b - a for a, b in box), box)

    def axis(self, index: int) -> AxisState:
        return AxisState(self.origin[index], self.size[index], self.valid[index])


def _intersect(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
    return (max(a[0], b[0]), min(a[1], b[1]))


def verify_layout(analysis: Analysis, tile: Tile, layout: TileLayout) -> None:
    """Check, from the layout's local numbers, that every kept region is exact; raise otherwise.

    A stage's inputs hold exact values everywhere (the image, or whole tensors kept by earlier
    stages); what the stage computes from them is exact where the layout says it is."""
    graph = analysis.graph
    known: dict[str, _Known] = {}
    assembled = layout.assembled()
    held = [t for t, _ in layout.inputs]
    # A tensor held only as strips (the tile owns none of it) is exact: earlier tiles computed
    # the strips exactly (each tile's own check).
    held += [t for t in assembled if is_empty(layout.computed.get(t))]
    for tensor in held:
        known[tensor] = _Known.holding(layout.regions[tensor])
    for spec in layout.nodes:
        node = graph.nodes[spec.node]
        result = _node_computes(analysis, spec, known)
        for out in node.output:
            if not out:
                continue
            claimed = layout.computed.get(out, layout.regions.get(out))
            box = tuple((o, o + s) for o, s in zip(result.origin, result.size))
            if box != tuple(claimed):
                raise CompileError(
                    f"tile {tile.index}: node {spec.node!r} ({node.op_type}) would compute "
                    f"region {result.origin}+{result.size} of {out!r}, not the planned "
                    f"{claimed}; refusing to emit an inexact program."
                )
            known[out] = result
            if layout.computed:
                # Halo reuse: later tiles read what this tile owns, so all of it must be exact;
                # then the tensor with its strips is exact where the tile holds it.
                if tuple(result.valid) != box:
                    raise CompileError(
                        f"tile {tile.index}: node {spec.node!r} ({node.op_type}) computes "
                        f"{out!r} exactly only on {result.valid} of its owned region {box}; "
                        "refusing to emit an inexact program.")
                if out in assembled:
                    known[out] = _Known.holding(layout.regions[out])
    stage = analysis.split.stage_io[layout.stage]
    for cut in stage.targets:
        kept = tile.kept.get(cut)
        if kept is None:
            continue
        k = known[cut]
        if not all(v[0] <= a and b <= v[1] for (a, b), v in zip(kept, k.valid)):
            raise CompileError(
                f"tile {tile.index}: the kept region {kept} of cut tensor {cut!r} is not inside "
                f"the region {k.valid} that the tile computes exactly; refusing to emit an "
                "inexact program."
            )


def _node_computes(analysis: Analysis, spec: NodeLayout, known: dict[str, _Known]) -> _Known:
    """What one node of the layout computes, from what its inputs hold on this tile."""
    node = analysis.graph.nodes[spec.node]
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
    placement = spec.placement
    origin, size, valid = [], [], []
    for axis, ax in enumerate(op.axes):
        tensor, k = inputs[0]
        state = op.tiling.computes(ax, k.axis(axis), analysis.extent(tensor)[axis],
                                   placement, axis)
        vv = state.valid
        for _other, ko in inputs[1:]:
            if (ko.origin[axis], ko.size[axis]) != (k.origin[axis], k.size[axis]):
                raise CompileError(
                    f"node {spec.node!r}: its grid inputs cover different regions on this tile."
                )
            vv = _intersect(vv, ko.valid[axis])
        j0, count = state.origin, state.size
        if placement.output_slice is not None:
            a, b = placement.output_slice[axis]
            j0, count = j0 + a, b - a
        origin.append(j0)
        size.append(count)
        valid.append(_intersect(vv, (j0, j0 + count)))
    return _Known(tuple(origin), tuple(size), tuple(valid))


# --- emission -----------------------------------------------------------------------------------


class _Builder:
    """The nodes and initializers of a tile graph being written (an :class:`Emitter`)."""

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

    def initializer(self, base: str, array: np.ndarray) -> str:
        name = self.fresh(base)
        self.initializers[name] = numpy_helper.from_array(array, name)
        return name

    def slice(self, tensor: str, local: Local, axes: Sequence[int],
              output: str | None = None) -> str:
        """``tensor`` sliced to ``local`` along its spatial axes (at positions ``axes``)."""
        out = output or self.fresh(tensor)
        self.nodes.append(helper.make_node(
            "Slice",
            [tensor, self.ints([a for a, _ in local]), self.ints([b for _, b in local]),
             self.ints(list(axes))],
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

    Inputs: the crop of each stage input (named like the tensor: the image crop like the
    model's image input), the per-sample side inputs the stage reads, then every initializer in
    ``parameters`` that the tile reads (as graph inputs, fed by the runtime). Other initializers
    stay initializers. Outputs: the kept region of each stage output, named by
    ``output_names`` (default: :func:`kept_name`), then each reduction's partial over the
    region the tile owns (:func:`partial_name`).
    """
    model = analysis.model
    graph = analysis.graph
    builder = _Builder(f"{name}_")
    assembled = layout.assembled()
    for tensor, parts in assembled.items():
        if is_empty(layout.computed.get(tensor)):
            _emit_assembly(analysis, tensor, parts, None, builder)
    for spec in layout.nodes:
        _emit_node(analysis, spec, builder)
        for out in graph.nodes[spec.node].output:
            if out in assembled:
                own = builder.fresh(f"{out}:own")
                _rename(builder.nodes, out, own)
                _emit_assembly(analysis, out, assembled[out], own, builder)
    partials = _emit_partials(analysis, layout, builder)
    emits = []
    for output, tensor, local in layout.emits:
        builder.slice(tensor, local, analysis.split.layout(tensor), output=output)
        emits.append(output)
    outputs = _emit_outputs(analysis, layout, builder, output_names) + partials + emits
    nodes = _with_constant_nodes(analysis, builder.nodes)
    used = {i for n in nodes for i in n.input if i}
    inits = {i.name: i for i in model.graph.initializer}
    inputs = [_crop_info(analysis, tensor, tensor, size) for tensor, size in layout.inputs]
    inputs += [_crop_info(analysis, name, tensor, size)
               for name, tensor, _axis, size in layout.strips]
    for tensor in analysis.split.stage_io[layout.stage].side_inputs:
        if tensor in used:
            inputs.append(helper.make_tensor_value_info(
                tensor, graph.dtypes.get(tensor, 1), list(graph.shape(tensor))))
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


def _crop_info(analysis: Analysis, name: str, tensor: str, size: Sequence[int]
               ) -> onnx.ValueInfoProto:
    """A graph input ``name`` holding a region of ``size`` (spatial axes) of ``tensor``."""
    shape = list(analysis.graph.shape(tensor))
    for position, n in zip(analysis.split.layout(tensor), size):
        shape[position] = n
    return helper.make_tensor_value_info(name, analysis.graph.dtypes.get(tensor, 1), shape)


def _emit_assembly(analysis: Analysis, tensor: str, parts: list[tuple[str, int]],
                   own: str | None, builder: _Builder) -> None:
    """``tensor`` as the tile holds it: its strips (graph inputs) concatenated in front of the
    region it computes (``own``), the last axis first (docs/architecture.md)."""
    layout = analysis.split.layout(tensor)
    current = own
    for k, (strip, axis) in enumerate(reversed(parts)):
        last = k == len(parts) - 1
        out = tensor if last else builder.fresh(tensor)
        if current is None:
            if not last:
                current = strip
                continue
            builder.nodes.append(helper.make_node("Identity", [strip], [out],
                                                  name=builder.fresh("strip")))
        else:
            builder.nodes.append(helper.make_node("Concat", [strip, current], [out],
                                                  axis=layout[axis],
                                                  name=builder.fresh("assemble")))
        current = out


def _emit_node(analysis: Analysis, spec: NodeLayout, builder: _Builder) -> None:
    """One prefix node on the tile: its inputs sliced, its placement written in by its tiling
    rule, its output sliced when the rule computes more than is needed."""
    node = analysis.graph.nodes[spec.node]
    op = analysis.split.local_ops[spec.node]
    layout = analysis.split.layout
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    for slot, local in spec.input_slices:
        if local is not None:
            tensor = node.input[slot]
            copy.input[slot] = builder.slice(tensor, local, layout(tensor))
    op.tiling.rewrite(copy, op.axes, spec.placement, op.attrs, analysis.graph.opset, builder)
    output_slice = spec.placement.output_slice
    if output_slice is None:
        builder.nodes.append(copy)
        return
    final = copy.output[0]
    copy.output[0] = builder.fresh(final)
    builder.nodes.append(copy)
    builder.slice(copy.output[0], output_slice, layout(final), output=final)


def _emit_outputs(analysis: Analysis, layout: TileLayout, builder: _Builder,
                  output_names: dict[str, str] | None) -> list[str]:
    outputs = []
    for cut, local in layout.outputs:
        out_name = kept_name(cut) if output_names is None else output_names[cut]
        if local is not None:
            source = builder.slice(cut, local, analysis.split.layout(cut))
            _rename(builder.nodes, source, out_name)
        elif cut != analysis.input_name and not _identity_output_is_safe(builder.nodes, cut):
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
    return outputs


def _emit_partials(analysis: Analysis, layout: TileLayout, builder: _Builder) -> list[str]:
    """Each reduction of the stage over the region of its tensor this tile owns, kept dims."""
    rules = {r.output: r for r in analysis.split.stage_io[layout.stage].reductions}
    outputs = []
    for reduction_output, local in layout.partials:
        reduction = rules[reduction_output]
        tensor = reduction.tensor
        owned = tensor if local is None else builder.slice(tensor, local,
                                                           analysis.split.layout(tensor))
        out = partial_name(reduction_output)
        axes = list(reduction.rule.axes)
        opset = analysis.graph.opset
        if opset >= 18 or (reduction.rule.partial == "ReduceSum" and opset >= 13):
            node = helper.make_node(reduction.rule.partial, [owned, builder.ints(axes)], [out],
                                    name=builder.fresh("partial"), keepdims=1)
        else:
            node = helper.make_node(reduction.rule.partial, [owned], [out], axes=axes,
                                    name=builder.fresh("partial"), keepdims=1)
        builder.nodes.append(node)
        outputs.append(out)
    return outputs


def _identity_output_is_safe(nodes: list[onnx.NodeProto], tensor: str) -> bool:
    """Whether ``tensor`` may reach a graph output through an Identity: it is read by other
    nodes (so renaming it would make it a graph output with consumers, which ORT's
    Conv-Add-activation fusion mishandles), and none of them is a Pad (see the caller)."""
    readers = [n for n in nodes if tensor in n.input]
    return bool(readers) and not any(n.op_type in IDENTITY_OUTPUT_UNSAFE_READERS
                                     for n in readers)


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


def partial_name(reduction_output: str) -> str:
    """Name of a tile graph's output that holds its partial of a whole-image reduction."""
    return f"{reduction_output}:partial"
