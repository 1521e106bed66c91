"""Locality split and analysis: cut tensors, strides, where the prefix stops and why, errors.

Zoo models (torch exports) check the split on real exporter output; hand-built ONNX graphs
(``onnx.helper``) cover ops the zoo lacks. :data:`HANDBUILT` is shared with the exactness tests,
which compile the same graphs and compare tiled with untiled results.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import streamc
import zoo
from streamc.check import check as run_check
from streamc.errors import ModelLoadError, StreamcError, UnsupportedModelError

F = Fraction


def _gap_input(model: onnx.ModelProto) -> str:
    (gap,) = [n for n in model.graph.node if n.op_type == "GlobalAveragePool"]
    return gap.input[0]


def _producer(model: onnx.ModelProto, tensor: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if tensor in n.output)


# --------------------------------------------------------------------------------------------
# Zoo models
# --------------------------------------------------------------------------------------------

#: Per zoo model: (strides of the cut tensors in order, op producing each cut, op types that
#: stop the prefix).
ZOO_EXPECTED: dict[str, tuple[list[tuple[int, ...]], list[str], set[str]]] = {
    "vgg": ([(4, 4)], ["Conv"], {"GlobalAveragePool"}),
    "resnet": ([(8, 8)], ["Relu"], {"GlobalAveragePool"}),
    "unet": ([(1, 1)], ["Conv"], set()),
    "dilated": ([(2, 2)], ["Conv"], {"GlobalAveragePool"}),
    "nonsquare": ([(4, 6)], ["Conv"], {"GlobalAveragePool"}),
    "zeropad": ([(2, 2)], ["Relu"], {"GlobalAveragePool"}),
    "twocut": ([(4, 4), (8, 8)], ["Relu", "Relu"], {"ReduceMean"}),
    "conv3d": ([(4, 4, 4)], ["Relu"], {"GlobalAveragePool"}),
    "mixed_act": ([(2, 2)], ["Tanh"], {"GlobalAveragePool"}),
}


ZOO_ALIGNMENT = {
    "vgg": (4, 4), "resnet": (8, 8), "unet": (2, 2), "dilated": (2, 2), "nonsquare": (4, 6),
    "zeropad": (2, 2), "twocut": (8, 8), "conv3d": (4, 4, 4), "mixed_act": (2, 2),
}


def _end_ops(a) -> set[str]:
    """Ops that end the grid: non-local readers, and the head's reductions streamed as
    per-tile partials."""
    return ({s.op for s in a.stops}
            | {a.graph.nodes[r.node].op_type for r in a.split.final_reductions})


@pytest.mark.parametrize("name", zoo.LOCAL_NAMES)
def test_zoo_split(name: str) -> None:
    zm = zoo.build(name)
    a = streamc.analyze(zm.onnx_model)
    strides, producers, stop_ops = ZOO_EXPECTED[name]
    assert len(a.ends) == len(strides)
    assert [a.tensors[c].stride for c in a.ends] == [
        tuple(F(s) for s in st) for st in strides
    ]
    assert [a.tensors[c].op for c in a.ends] == producers
    assert _end_ops(a) == stop_ops
    for stop in a.stops:  # every stop names the node, the tensor it reads and a reason
        assert stop.tensor in a.ends
        assert stop.reason and stop.node in stop.sentence()
    # Cut sizes are what ONNX Runtime computes.
    values = zoo.run_onnx(zoo.expose_tensor(zm.onnx_model, a.ends), {"image": zm.image()})
    for cut in a.ends:
        assert a.extent(cut) == values[cut].shape[2:]
    # Every node is in the prefix, the head or the image-independent constants.
    all_nodes = {n.name for n in a.model.graph.node}
    reductions = {r.node for r in a.split.reductions}
    assert set(a.prefix) | set(a.head) | set(a.split.constant_nodes) | reductions == all_nodes
    assert not set(a.prefix) & set(a.head)
    # Alignment: lcm of the strides inside the prefix (unet pools by 2 and upsamples back).
    assert a.alignment == ZOO_ALIGNMENT[name]


def test_zoo_specific_cuts() -> None:
    vgg = zoo.build("vgg")
    a = streamc.analyze(vgg.onnx_model)
    assert a.ends == [_gap_input(vgg.onnx_model)]
    assert a.tensors[a.ends[0]].receptive_field == (24, 24)
    assert a.tensors[a.ends[0]].offset == (10, 10)

    unet = streamc.analyze(zoo.build("unet").onnx_model)
    assert unet.cut_tensors == ["logits"] and unet.head == [] and unet.stops == []
    assert "Resize" in {unet.tensors[t].op for t in unet.tensors}
    assert "Concat" in {unet.tensors[t].op for t in unet.tensors}

    resnet = streamc.analyze(zoo.build("resnet").onnx_model)
    ops = {resnet.graph.nodes[n].op_type for n in resnet.prefix}
    assert {"Conv", "BatchNormalization", "Relu", "MaxPool", "Add"} <= ops
    assert resnet.tensors[resnet.ends[0]].receptive_field == (51, 51)
    assert {resnet.graph.nodes[n].op_type for n in resnet.head} == {"Flatten", "Gemm"}
    (pool,) = resnet.split.final_reductions  # streamed: the feature map is never whole
    assert resnet.graph.nodes[pool.node].op_type == "GlobalAveragePool"
    assert resnet.cut_tensors == [] and pool.tensor == resnet.ends[0]

    zeropad = streamc.analyze(zoo.build("zeropad").onnx_model)
    assert "Pad" in {zeropad.graph.nodes[n].op_type for n in zeropad.prefix}
    # ZeroPad2d((left=1, right=2, top=0, bottom=3)): begin padding 0 rows, 1 column.
    assert zeropad.tensors[zeropad.ends[0]].offset == (0, 1)

    twocut = zoo.build("twocut")
    a = streamc.analyze(twocut.onnx_model)
    f4, f8 = a.ends
    # The stride-4 map is a cut (read by the head) and also feeds the next conv.
    consumers = {n.op_type for n in twocut.onnx_model.graph.node if f4 in n.input}
    assert consumers == {"Conv", "ReduceMean"}
    assert a.alignment == (8, 8)

    nonsquare = streamc.analyze(zoo.build("nonsquare").onnx_model)
    assert nonsquare.alignment == (4, 6)
    same = [n for n in nonsquare.prefix
            if any(x.name == "auto_pad" for x in nonsquare.graph.nodes[n].attribute)]
    assert same  # the SAME_UPPER conv is in the prefix

    conv3d = streamc.analyze(zoo.build("conv3d").onnx_model)
    assert conv3d.n_spatial == 3 and conv3d.alignment == (4, 4, 4)


def test_analysis_to_dict_and_dynamic_sizes() -> None:
    dyn = zoo.build("resnet", dynamic=True)
    a = streamc.analyze(dyn.onnx_model)
    assert a.image_size == (None, None)
    assert a.tensors[a.ends[0]].stride == (8, 8)  # strides need no sizes
    fixed = streamc.analyze(dyn.onnx_model, image=(80, 72))
    assert fixed.image_size == (80, 72) and fixed.extent(fixed.ends[0]) == (10, 9)
    d = fixed.to_dict()
    assert d["cut_tensors"][0]["stride"] == [8, 8]
    assert d["cut_tensors"][0]["reduced"] == "GlobalAveragePool" and not d["stopped_by"]
    unet = streamc.analyze(zoo.build("unet").onnx_model).to_dict()
    strides = {tuple(t["stride"]) for t in unet["tensors"]}
    assert (2, 2) in strides and (1, 1) in strides


def test_analyze_from_path(onnx_file) -> None:
    path = onnx_file(zoo.build("vgg"))
    a = streamc.analyze(str(path))
    assert len(a.ends) == 1
    with pytest.raises(ModelLoadError, match="no such file"):
        streamc.analyze(path.parent / "missing.onnx")
    bad = path.parent / "bad.onnx"
    bad.write_bytes(b"this is not a protobuf")
    with pytest.raises(ModelLoadError):
        streamc.analyze(bad)


# --------------------------------------------------------------------------------------------
# Hand-built graphs
# --------------------------------------------------------------------------------------------


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


@dataclass
class Built:
    """A hand-built model and what the analysis should find."""

    model: onnx.ModelProto
    cut_strides: list[tuple[Fraction, ...]]
    stop_ops: set[str] = field(default_factory=set)
    stop_reason: str | None = None  # a regex that some stop's reason matches
    prefix_ops: set[str] = field(default_factory=set)  # op types that must be in the prefix
    tiles: tuple[int, ...] = (8, 12)  # tile sizes the exactness tests compile with


def make_model(
    nodes: list[onnx.NodeProto],
    inits: dict[str, np.ndarray],
    image: tuple[int, ...],
    outputs: list[str] | None = None,
    opset: int = 17,
) -> onnx.ModelProto:
    """A model with input ``image`` (float, shape ``image``) and float outputs (shapes
    inferred)."""
    outputs = outputs or [nodes[-1].output[0]]
    graph = helper.make_graph(
        nodes, "handbuilt",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, list(image))],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    infos = {vi.name: vi for vi in inferred.graph.value_info}
    del model.graph.output[:]
    model.graph.output.extend(infos[o] if o in infos else next(
        x for x in inferred.graph.output if x.name == o) for o in outputs)
    onnx.checker.check_model(model, full_check=True)
    return model


def _w(*shape: int, seed: int = 0, scale: float = 0.3) -> np.ndarray:
    return (_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def _node(op: str, inputs: list[str], output: str, **attrs) -> onnx.NodeProto:
    return helper.make_node(op, inputs, [output], name=output, **attrs)


def _head(x: str, channels: int) -> tuple[list[onnx.NodeProto], dict[str, np.ndarray]]:
    """GlobalAveragePool, Flatten, Gemm: a small classification head reading ``x``."""
    return (
        [_node("GlobalAveragePool", [x], "gap"), _node("Flatten", ["gap"], "flat"),
         _node("Gemm", ["flat", "fc_w", "fc_b"], "logits", transB=1)],
        {"fc_w": _w(3, channels, seed=9), "fc_b": _w(3, seed=10)},
    )


def conv_transpose() -> Built:
    nodes = [
        _node("Conv", ["image", "w1", "b1"], "c1", kernel_shape=[3, 3], strides=[2, 2],
              pads=[1, 1, 1, 1]),
        _node("Relu", ["c1"], "r1"),
        _node("ConvTranspose", ["r1", "wt", "bt"], "ct", kernel_shape=[3, 4], strides=[2, 2],
              pads=[1, 1, 1, 2], output_padding=[1, 0]),
        _node("Conv", ["ct", "w2"], "c2", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
    ]
    head, inits = _head("c2", 2)
    inits.update({"w1": _w(4, 2, 3, 3), "b1": _w(4, seed=1), "wt": _w(4, 3, 3, 4, seed=2),
                  "bt": _w(3, seed=3), "w2": _w(2, 3, 3, 3, seed=4)})
    return Built(make_model(nodes + head, inits, (1, 2, 21, 19)), [(F(1), F(1))],
                 {"GlobalAveragePool"}, prefix_ops={"ConvTranspose"}, tiles=(10, 14))


def lp_pool() -> Built:
    nodes = [
        _node("Conv", ["image", "w1"], "c1", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        _node("LpPool", ["c1"], "lp", kernel_shape=[3, 2], strides=[2, 2], pads=[1, 0, 1, 1],
              p=2),
        _node("Conv", ["lp", "w2"], "c2", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
    ]
    head, inits = _head("c2", 2)
    inits.update({"w1": _w(3, 2, 3, 3), "w2": _w(2, 3, 3, 3, seed=1)})
    return Built(make_model(nodes + head, inits, (1, 2, 19, 22)), [(F(2), F(2))],
                 {"GlobalAveragePool"}, prefix_ops={"LpPool"}, tiles=(10, 14))


def pad_axes_opset18() -> Built:
    """Pad with an ``axes`` input (opset 18): pads only the last axis (2 before, 1 after)."""
    nodes = [
        _node("Pad", ["image", "pads", "", "axes"], "p", mode="constant"),
        _node("Conv", ["p", "w1"], "c1", kernel_shape=[3, 4], strides=[1, 2]),
        _node("Sigmoid", ["c1"], "s1"),
    ]
    head, inits = _head("s1", 3)
    inits.update({"pads": np.array([2, 1], dtype=np.int64),
                  "axes": np.array([-1], dtype=np.int64), "w1": _w(3, 2, 3, 4)})
    return Built(make_model(nodes + head, inits, (1, 2, 17, 20), opset=18), [(F(1), F(2))],
                 {"GlobalAveragePool"}, prefix_ops={"Pad"})


def resize_sizes() -> Built:
    """Nearest Resize given by a ``sizes`` input (×2 on H, ×3 on W)."""
    nodes = [
        _node("Conv", ["image", "w1"], "c1", kernel_shape=[3, 3], strides=[2, 3],
              pads=[1, 1, 1, 1]),
        _node("Resize", ["c1", "", "", "sizes"], "up", mode="nearest",
              coordinate_transformation_mode="asymmetric", nearest_mode="floor"),
        _node("Conv", ["up", "w2"], "c2", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
    ]
    inits = {"sizes": np.array([1, 3, 20, 21], dtype=np.int64), "w1": _w(3, 2, 3, 3),
             "w2": _w(2, 3, 3, 3, seed=1)}
    head, head_inits = _head("c2", 2)
    inits.update(head_inits)
    return Built(make_model(nodes + head, inits, (1, 2, 20, 21)), [(F(1), F(1))],
                 {"GlobalAveragePool"}, prefix_ops={"Resize"}, tiles=(10, 14))


def split_clip_dropout() -> Built:
    """Channel Split into two branches (Clip; HardSigmoid), eval Dropout, channel Concat."""
    nodes = [
        _node("Conv", ["image", "w1", "b1"], "c1", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Split", ["c1", "split"], ["s0", "s1"], name="split", axis=1),
        _node("Clip", ["s0", "lo", "hi"], "clip"),
        _node("HardSigmoid", ["s1"], "hs", alpha=0.3, beta=0.4),
        _node("Concat", ["clip", "hs"], "cat", axis=1),
        helper.make_node("Dropout", ["cat", "ratio"], ["drop"], name="drop"),
        _node("Conv", ["drop", "w2"], "c2", kernel_shape=[3, 3], strides=[2, 2],
              pads=[1, 1, 1, 1]),
    ]
    head, inits = _head("c2", 3)
    inits.update({"w1": _w(4, 2, 3, 3), "b1": _w(4, seed=1), "w2": _w(3, 4, 3, 3, seed=2),
                  "split": np.array([2, 2], dtype=np.int64),
                  "lo": np.array(-0.5, dtype=np.float32), "hi": np.array(0.6, dtype=np.float32),
                  "ratio": np.array(0.5, dtype=np.float32)})
    return Built(make_model(nodes + head, inits, (1, 2, 18, 17)), [(F(2), F(2))],
                 {"GlobalAveragePool"},
                 prefix_ops={"Split", "Clip", "HardSigmoid", "Concat", "Dropout"})


def smooth_activations() -> Built:
    """Softplus, Selu, and Max/Min/Pow against per-channel constants."""
    nodes = [
        _node("Conv", ["image", "w1", "b1"], "c1", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        _node("Softplus", ["c1"], "sp"),
        _node("Selu", ["sp"], "se"),
        _node("Max", ["se", "cmax"], "mx"),
        _node("Min", ["mx", "cmin"], "mn"),
        _node("Pow", ["mn", "two"], "pw"),
        _node("Conv", ["pw", "w2"], "c2", kernel_shape=[2, 2], strides=[2, 2]),
    ]
    head, inits = _head("c2", 3)
    inits.update({"w1": _w(3, 2, 3, 3), "b1": _w(3, seed=1), "w2": _w(3, 3, 2, 2, seed=2),
                  "cmax": np.array([[[0.1]], [[0.3]], [[0.5]]], dtype=np.float32),
                  "cmin": np.array([1.5, 1.6, 1.7], dtype=np.float32).reshape(1, 3, 1, 1),
                  "two": np.array(2.0, dtype=np.float32)})
    return Built(make_model(nodes + head, inits, (1, 2, 16, 18)), [(F(2), F(2))],
                 {"GlobalAveragePool"}, prefix_ops={"Softplus", "Selu", "Max", "Min", "Pow"})


def spatial_mul() -> Built:
    """A Mul by a constant that varies over space is not local: the prefix stops before it."""
    nodes = [
        _node("Conv", ["image", "w1"], "c1", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        _node("Relu", ["c1"], "r1"),
        _node("Mul", ["r1", "mask"], "masked"),
        _node("Conv", ["masked", "w2"], "c2", kernel_shape=[3, 3]),
    ]
    head, inits = _head("c2", 2)
    inits.update({"w1": _w(3, 2, 3, 3), "w2": _w(2, 3, 3, 3, seed=1),
                  "mask": _w(1, 1, 16, 16, seed=3)})
    return Built(make_model(nodes + head, inits, (1, 2, 16, 16)), [(F(1), F(1))], {"Mul"},
                 stop_reason="varies over space", prefix_ops={"Relu"})


def two_cuts_far_apart() -> Built:
    """Two cut tensors at strides 1 and 6 and an early exit: tiles whose kept region of one
    cut is empty."""
    nodes = [
        _node("Conv", ["image", "w1"], "c1", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        _node("Tanh", ["c1"], "t1"),
        _node("Conv", ["t1", "w2"], "c2", kernel_shape=[6, 6], strides=[6, 6]),
        _node("ReduceMean", ["t1"], "m1", axes=[2, 3], keepdims=0),
        _node("ReduceMean", ["c2"], "m2", axes=[2, 3], keepdims=0),
        _node("Concat", ["m1", "m2"], "logits", axis=1),
    ]
    inits = {"w1": _w(3, 2, 3, 3), "w2": _w(2, 3, 6, 6, seed=1)}
    return Built(make_model(nodes, inits, (1, 2, 25, 20)), [(F(1), F(1)), (F(6), F(6))],
                 {"ReduceMean"}, tiles=(12, 16))


def same_stride2_odd() -> Built:
    """auto_pad SAME_UPPER / SAME_LOWER with stride 2 on odd sizes (padding depends on size)."""
    nodes = [
        _node("Conv", ["image", "w1"], "c1", kernel_shape=[4, 3], strides=[2, 2],
              auto_pad="SAME_UPPER"),
        _node("Relu", ["c1"], "r1"),
        _node("MaxPool", ["r1"], "p1", kernel_shape=[2, 3], strides=[2, 2],
              auto_pad="SAME_LOWER"),
        _node("Conv", ["p1", "w2"], "c2", kernel_shape=[3, 3], auto_pad="SAME_UPPER"),
    ]
    head, inits = _head("c2", 2)
    inits.update({"w1": _w(4, 2, 4, 3), "w2": _w(2, 4, 3, 3, seed=1)})
    return Built(make_model(nodes + head, inits, (1, 2, 23, 21)), [(F(4), F(4))],
                 {"GlobalAveragePool"}, tiles=(16, 20))


def ceil_pools() -> Built:
    """ceil_mode max and average pooling whose last window overhangs the border."""
    nodes = [
        _node("Conv", ["image", "w1"], "c1", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        _node("MaxPool", ["c1"], "p1", kernel_shape=[3, 2], strides=[2, 2], pads=[1, 0, 1, 0],
              ceil_mode=1),
        _node("AveragePool", ["p1"], "p2", kernel_shape=[2, 3], strides=[2, 3],
              pads=[0, 1, 1, 1], ceil_mode=1, count_include_pad=0),
        _node("Conv", ["p2", "w2"], "c2", kernel_shape=[1, 1]),
    ]
    head, inits = _head("c2", 2)
    inits.update({"w1": _w(3, 2, 3, 3), "w2": _w(2, 3, 1, 1, seed=1)})
    return Built(make_model(nodes + head, inits, (1, 2, 23, 26)), [(F(4), F(6))],
                 {"GlobalAveragePool"}, tiles=(12, 18))


HANDBUILT: dict[str, Callable[[], Built]] = {
    "conv_transpose": conv_transpose,
    "lp_pool": lp_pool,
    "pad_axes_opset18": pad_axes_opset18,
    "resize_sizes": resize_sizes,
    "split_clip_dropout": split_clip_dropout,
    "smooth_activations": smooth_activations,
    "spatial_mul": spatial_mul,
    "two_cuts_far_apart": two_cuts_far_apart,
    "same_stride2_odd": same_stride2_odd,
}


@pytest.mark.parametrize("name", [*HANDBUILT, "ceil_pools"])
def test_handbuilt_split(name: str) -> None:
    built = (HANDBUILT[name] if name in HANDBUILT else globals()[name])()
    a = streamc.analyze(built.model)
    assert [a.tensors[c].stride for c in a.ends] == built.cut_strides
    assert _end_ops(a) == built.stop_ops
    if built.stop_reason:
        assert any(re.search(built.stop_reason, s.reason) for s in a.stops), [
            s.reason for s in a.stops]
    prefix_ops = {a.graph.nodes[n].op_type for n in a.prefix}
    assert built.prefix_ops <= prefix_ops


def test_conv_transpose_field() -> None:
    a = streamc.analyze(conv_transpose().model)
    ct = a.tensors["ct"]
    assert ct.stride == (F(1), F(1))
    # ConvTranspose output j reads inputs i with i·2 − p + t = j: 1 or 2 of them per axis.
    r1 = a.tensors["r1"]
    assert r1.stride == (F(2), F(2))
    assert a.alignment == (2, 2)


def test_same_padding_follows_image_size() -> None:
    a = streamc.analyze(same_stride2_odd().model)
    conv = a.split.local_ops["c1"]
    # SAME_UPPER, kernel 4 stride 2 on 23 rows: out 12, total pad 2*11 + 4 - 23 = 3 -> (1, 2).
    assert (conv.axes[0].pad_begin, conv.axes[0].pad_end) == (1, 2)
    # kernel 3 stride 2 on 21 columns: out 11, total 20 + 3 - 21 = 2 -> (1, 1).
    assert (conv.axes[1].pad_begin, conv.axes[1].pad_end) == (1, 1)
    pool = a.split.local_ops["p1"]
    # SAME_LOWER on 12 x 11: kernel 2 -> total 2*5 + 2 - 12 = 0; kernel 3 -> 2*5 + 3 - 11 = 2.
    assert (pool.axes[0].pad_begin, pool.axes[0].pad_end) == (0, 0)
    assert (pool.axes[1].pad_begin, pool.axes[1].pad_end) == (1, 1)
    # A different image size gives different padding.
    b = streamc.analyze(same_stride2_odd().model, image=(24, 22))
    conv = b.split.local_ops["c1"]
    assert (conv.axes[0].pad_begin, conv.axes[0].pad_end) == (1, 1)


def test_ceil_mode_sizes_follow_the_runtime() -> None:
    """ONNX shape inference keeps a ceil_mode window that starts in the end padding; ORT and
    torch drop it. The analysis must use the runtime's sizes."""
    built = ceil_pools()
    a = streamc.analyze(built.model)
    x = zoo.random_image((1, 2, 23, 26))
    for tensor in ("p1", "p2", "c2"):
        exposed = zoo.expose_tensor(built.model, tensor)
        value = zoo.run_onnx(exposed, {"image": x})[tensor]
        assert a.extent(tensor) == value.shape[2:], tensor
    # The torch export of the same kind of pool agrees.
    import torch

    y = torch.nn.functional.avg_pool2d(torch.zeros(1, 1, 13, 29), 3, 3, (0, 1), ceil_mode=True)
    node = _node("AveragePool", ["image"], "y", kernel_shape=[3, 3], strides=[3, 3],
                 pads=[0, 1, 0, 1], ceil_mode=1)
    m = make_model([node], {}, (1, 1, 13, 29))
    assert streamc.analyze(m).extent("y") == tuple(y.shape[2:]) == (5, 10)


# --------------------------------------------------------------------------------------------
# Errors: one clear StreamcError each
# --------------------------------------------------------------------------------------------


def _error(model: onnx.ModelProto, cls: type[StreamcError] = UnsupportedModelError) -> str:
    with pytest.raises(cls) as info:
        streamc.analyze(model)
    message = str(info.value)
    assert "\n" not in message and message.endswith((".", ")")), message
    return message


def test_no_image_like_input() -> None:
    nodes = [_node("Gemm", ["x", "w"], "y", transB=1)]
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [numpy_helper.from_array(_w(4, 8), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    message = _error(model)
    assert "no image-like input" in message and "'x'" in message


def test_unknown_input_name() -> None:
    with pytest.raises(UnsupportedModelError, match="no input named 'pixels'"):
        streamc.analyze(zoo.build("vgg").onnx_model, input="pixels")


def test_first_op_not_local() -> None:
    message = _error(zoo.build("nonlocal_first").onnx_model)
    assert "CumSum" in message and "no spatially local prefix" in message


def _bn_training(first: bool) -> onnx.ModelProto:
    c = 2 if first else 3
    bn = helper.make_node(
        "BatchNormalization", ["image" if first else "c1", "s", "b", "m", "v"],
        ["bn", "running_mean", "running_var"], name="bn_train", training_mode=1)
    nodes = ([] if first else [_node("Conv", ["image", "w1"], "c1", kernel_shape=[3, 3])])
    nodes += [bn, _node("Relu", ["bn"], "r")]
    head, inits = _head("r", c)
    inits.update({"s": _w(c) + 1, "b": _w(c, seed=1), "m": _w(c, seed=2),
                  "v": np.abs(_w(c, seed=3)) + 1, "w1": _w(3, 2, 3, 3)})
    return make_model(nodes + head, inits, (2, 2, 12, 12), opset=15)


@pytest.mark.parametrize("first", [True, False], ids=["first_op", "after_conv"])
def test_training_mode_batchnorm(first: bool) -> None:
    message = _error(_bn_training(first))
    assert "bn_train" in message and "BatchNormalization" in message
    assert "eval mode" in message


def test_training_mode_dropout() -> None:
    nodes = [
        _node("Conv", ["image", "w1"], "c1", kernel_shape=[3, 3]),
        helper.make_node("Dropout", ["c1", "ratio", "train"], ["d"], name="drop_train"),
    ]
    head, inits = _head("d", 3)
    inits.update({"w1": _w(3, 2, 3, 3), "ratio": np.array(0.5, dtype=np.float32),
                  "train": np.array(True)})
    message = _error(make_model(nodes + head, inits, (1, 2, 12, 12)))
    assert "drop_train" in message and "eval mode" in message


def _first_op(node: onnx.NodeProto, inits: dict[str, np.ndarray],
              image: tuple[int, ...] = (1, 2, 8, 8)) -> onnx.ModelProto:
    return make_model([node], inits, image)


def test_spatial_concat() -> None:
    first = _first_op(_node("Concat", ["image", "image"], "y", axis=2), {})
    message = _error(first)
    assert "axis 2" in message and "channel axis" in message
    # After a conv: the prefix stops at the Concat, with the reason.
    nodes = [_node("Conv", ["image", "w1"], "c1", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             _node("Concat", ["c1", "c1"], "y", axis=-1)]
    a = streamc.analyze(make_model(nodes, {"w1": _w(3, 2, 3, 3)}, (1, 2, 8, 8)))
    (stop,) = a.stops
    assert stop.op == "Concat" and "axis 3" in stop.reason
    assert a.ends == ["c1"]


@pytest.mark.parametrize("mode, transform, expected", [
    ("cubic", "half_pixel", "Resize mode 'cubic'"),
    ("linear", "align_corners", "'align_corners'"),
    ("linear", "asymmetric", "half_pixel"),
])
def test_resize_interpolating_refused(mode: str, transform: str, expected: str) -> None:
    scales = {"scales": np.array([1, 1, 2, 2], dtype=np.float32)}
    first = _first_op(_node("Resize", ["image", "", "scales"], "y", mode=mode,
                            coordinate_transformation_mode=transform), scales)
    assert expected in _error(first)


def test_resize_linear_half_pixel_is_local() -> None:
    """Bilinear upsampling (align_corners=False) is lowered to an edge Pad and a depthwise
    ConvTranspose: local."""
    scales = {"scales": np.array([1, 1, 2, 2], dtype=np.float32)}
    first = _first_op(_node("Resize", ["image", "", "scales"], "y", mode="linear"), scales)
    a = streamc.analyze(first)
    assert not a.stops and a.ends == ["y"]


@pytest.mark.parametrize(
    "attrs, reason",
    [
        ({"coordinate_transformation_mode": "tf_half_pixel_for_nn"}, "does not map output j"),
        ({"coordinate_transformation_mode": "asymmetric", "nearest_mode": "ceil"},
         "does not map output j"),
        # torch's default export, and half_pixel with either rounding, are floor(j / 2).
        ({"coordinate_transformation_mode": "half_pixel", "nearest_mode": "round_prefer_ceil"},
         None),
        ({"coordinate_transformation_mode": "half_pixel"}, None),
        ({"coordinate_transformation_mode": "asymmetric"}, None),
        ({"coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"}, None),
    ],
)
def test_resize_nearest_coordinate_modes(attrs: dict, reason: str | None) -> None:
    nodes = [_node("Conv", ["image", "w1"], "c1", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             _node("Resize", ["c1", "", "scales"], "y", mode="nearest", **attrs)]
    inits = {"w1": _w(3, 2, 3, 3), "scales": np.array([1, 1, 2, 2], dtype=np.float32)}
    a = streamc.analyze(make_model(nodes, inits, (1, 2, 8, 8)))
    if reason is None:
        assert a.stops == [] and a.ends == ["y"]
        assert a.tensors["y"].stride == (F(1, 2), F(1, 2))
    else:
        (stop,) = a.stops
        assert reason in stop.reason


def test_non_integer_resize_stops() -> None:
    nodes = [_node("Conv", ["image", "w1"], "c1", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             _node("Resize", ["c1", "", "scales"], "y", mode="nearest",
                   coordinate_transformation_mode="asymmetric")]
    inits = {"w1": _w(3, 2, 3, 3), "scales": np.array([1, 1, 1.5, 1.5], dtype=np.float32)}
    a = streamc.analyze(make_model(nodes, inits, (1, 2, 8, 8)))
    (stop,) = a.stops
    assert "not an integer upsampling factor" in stop.reason


def test_pad_wrap_stops() -> None:
    """Wrap padding copies the far side of the image next to this one: not local (constant,
    edge and reflect padding are)."""
    nodes = [_node("Conv", ["image", "w1"], "c1", kernel_shape=[3, 3]),
             _node("Pad", ["c1", "pads"], "y", mode="wrap")]
    inits = {"w1": _w(3, 2, 3, 3), "pads": np.array([0, 0, 1, 1, 0, 0, 1, 1], dtype=np.int64)}
    a = streamc.analyze(make_model(nodes, inits, (1, 2, 8, 8), opset=19))
    (stop,) = a.stops
    assert "wrap" in stop.reason


def test_maxpool_indices_used_stops() -> None:
    nodes = [_node("Conv", ["image", "w1"], "c1", kernel_shape=[3, 3]),
             helper.make_node("MaxPool", ["c1"], ["p", "idx"], name="pool", kernel_shape=[2, 2],
                              strides=[2, 2]),
             _node("Cast", ["idx"], "y", to=TensorProto.FLOAT)]
    a = streamc.analyze(make_model(nodes, {"w1": _w(3, 2, 3, 3)}, (1, 2, 8, 8)))
    (stop,) = a.stops
    assert stop.op == "MaxPool" and "Indices" in stop.reason


def test_invalid_model_is_a_load_error() -> None:
    node = helper.make_node("Conv", ["image", "missing_weight"], ["y"])
    graph = helper.make_graph(
        [node], "broken",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 2, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(ModelLoadError, match="fails the ONNX checker"):
        streamc.analyze(model)


def test_image_size_mismatch() -> None:
    with pytest.raises(UnsupportedModelError, match="2 spatial axes"):
        streamc.analyze(zoo.build("vgg").onnx_model, image=(32, 32, 32))


def test_ceil_mode_with_pinned_output_shapes() -> None:
    """Declared output shapes (from the exporter) must not fight strict shape inference."""
    node = _node("MaxPool", ["image"], "y", kernel_shape=[3, 3], strides=[3, 3],
                 pads=[0, 1, 0, 1], ceil_mode=1)
    model = make_model([node], {}, (1, 1, 13, 29))
    dims = model.graph.output[0].type.tensor_type.shape.dim
    dims[3].dim_value = 10  # what ORT and torch compute (inference says 11)
    assert streamc.analyze(model).extent("y") == (5, 10)


def test_pooling_over_the_whole_map_starts_the_head() -> None:
    """AdaptiveMaxPool2d(1) exports as a MaxPool whose window is the whole feature map."""
    w = np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32)
    nodes = [
        _node("Conv", ["image", "w"], "c", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        _node("MaxPool", ["c"], "p", kernel_shape=[16, 12]),
    ]
    analysis = streamc.analyze(make_model(nodes, {"w": w}, (1, 3, 16, 12)))
    assert analysis.cut_tensors == ["c"]
    assert "global pooling" in analysis.stops[0].reason


def test_head_reductions_stream_unless_the_head_reads_their_map_otherwise() -> None:
    """A head that reads the map only through global pools (average and max, concatenated)
    gets them tile by tile, exactly; one that also reads the map itself keeps it whole."""
    w = np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32)
    conv = _node("Conv", ["image", "w"], "c", kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                 strides=[2, 2])
    pools = [_node("GlobalAveragePool", ["c"], "avg"), _node("GlobalMaxPool", ["c"], "max")]
    pooled = make_model([conv, *pools, _node("Concat", ["avg", "max"], "y", axis=1)],
                        {"w": w}, (1, 3, 40, 36))
    a = streamc.analyze(pooled)
    assert a.cut_tensors == [] and a.ends == ["c"] and a.head == ["y"]
    assert {r.node for r in a.split.final_reductions} == {"avg", "max"}
    report = run_check(pooled, (40, 36), 24)
    assert report.ok and len(report.program.tiles) > 1, report.to_dict()
    classic = streamc.analyze(pooled, reduce_final=False)
    assert classic.cut_tensors == ["c"] and not classic.split.reductions
    # The head also flattens the map: it is whole anyway, and the pool goes with it.
    also = make_model([conv, pools[0], _node("Flatten", ["c"], "flat")], {"w": w},
                      (1, 3, 40, 36), outputs=["avg", "flat"])
    b = streamc.analyze(also)
    assert b.cut_tensors == ["c"] and not b.split.reductions and "avg" in b.head
