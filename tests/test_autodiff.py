"""Tests of the reverse-mode driver (streamc.passes.autodiff) on small whole graphs."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import zoo
from streamc.errors import StreamcError, UnsupportedOpError
from streamc.export import export_torch
from streamc.passes.autodiff import BackwardGraph, build_backward, trainable_initializers

TOLERANCE = 1e-5


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return float(np.abs(actual - expected).max() / max(np.abs(expected).max(), 1e-30))


def value(name: str, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def make_model(nodes, inputs, outputs, initializers=(), opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "test", inputs, outputs, initializer=list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def run(backward: BackwardGraph, feeds: dict[str, np.ndarray], cotangents=None, seed: int = 0):
    """Run the backward graph (random cotangents unless given); return (grads, outs, cots)."""
    onnx.checker.check_model(backward.model, full_check=True)
    rng = np.random.default_rng(seed)
    shapes = {
        i.name: [d.dim_value for d in i.type.tensor_type.shape.dim]
        for i in backward.model.graph.input
    }
    cotangents = dict(cotangents or {})
    for out, name in backward.cotangents.items():
        if out not in cotangents:
            cotangents[out] = rng.standard_normal(shapes[name]).astype(np.float32)
    run_feeds = dict(feeds)
    run_feeds.update({backward.cotangents[o]: c for o, c in cotangents.items()})
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(backward.model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    names = list(backward.gradients.values()) + list(backward.outputs.values())
    results = dict(zip(names, session.run(names, run_feeds), strict=True))
    grads = {w: results[g] for w, g in backward.gradients.items()}
    outs = {o: results[n] for o, n in backward.outputs.items()}
    return grads, outs, cotangents


def rand(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Driver bookkeeping


def test_fan_out_is_summed() -> None:
    """x feeds Relu, Sigmoid and both slots of a Mul: its cotangent is the sum of all four."""
    shape = [2, 3, 4]
    model = make_model(
        [
            helper.make_node("Relu", ["x"], ["r"]),
            helper.make_node("Sigmoid", ["x"], ["s"]),
            helper.make_node("Mul", ["x", "x"], ["sq"]),
            helper.make_node("Sum", ["r", "s", "sq"], ["y"]),
        ],
        [value("x", shape)],
        [value("y", shape)],
    )
    x = rand(*shape)
    backward = build_backward(model, ["x"])
    grads, _, cots = run(backward, {"x": x})
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    y = torch.relu(xt) + torch.sigmoid(xt) + xt * xt
    (expected,) = torch.autograd.grad(y, xt, torch.tensor(cots["y"], dtype=torch.float64))
    assert relative_error(grads["x"], expected.numpy()) <= TOLERANCE


def test_broadcast_is_undone() -> None:
    shape = [2, 3, 4, 5]
    bias = numpy_helper.from_array(rand(3, 1, 1, seed=1), "bias")
    scale = numpy_helper.from_array(rand(5, seed=2), "scale")
    model = make_model(
        [helper.make_node("Add", ["x", "bias"], ["t"]),
         helper.make_node("Mul", ["t", "scale"], ["y"])],
        [value("x", shape)], [value("y", shape)], [bias, scale],
    )
    backward = build_backward(model, ["bias", "scale"])
    assert [i.name for i in backward.model.graph.input] == [
        "x", "bias", "scale", backward.cotangents["y"]
    ]
    x = rand(*shape)
    feeds = {"x": x, "bias": numpy_helper.to_array(bias), "scale": numpy_helper.to_array(scale)}
    grads, _, cots = run(backward, feeds)
    assert grads["bias"].shape == (3, 1, 1) and grads["scale"].shape == (5,)
    dy = cots["y"].astype(np.float64)
    expected_scale = (dy * (x + feeds["bias"])).sum(axis=(0, 1, 2))
    expected_bias = (dy * feeds["scale"]).sum(axis=(0, 2, 3)).reshape(3, 1, 1)
    assert relative_error(grads["scale"], expected_scale) <= TOLERANCE
    assert relative_error(grads["bias"], expected_bias) <= TOLERANCE


def _conv_relu_model() -> onnx.ModelProto:
    w = numpy_helper.from_array(rand(4, 3, 3, 3, seed=3), "w")
    return make_model(
        [helper.make_node("Conv", ["image", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
         helper.make_node("Relu", ["c"], ["y"], name="relu")],
        [value("image", [1, 3, 8, 8])], [value("y", [1, 4, 8, 8])], [w],
    )


def test_gradient_wrt_image_input_and_keep_outputs() -> None:
    model = _conv_relu_model()
    backward = build_backward(model, ["image", "w"], keep_outputs=True)
    image = rand(1, 3, 8, 8, seed=4)
    w = numpy_helper.to_array(model.graph.initializer[0])
    grads, outs, cots = run(backward, {"image": image, "w": w})
    xt = torch.tensor(image, dtype=torch.float64, requires_grad=True)
    wt = torch.tensor(w, dtype=torch.float64, requires_grad=True)
    y = torch.relu(torch.nn.functional.conv2d(xt, wt, padding=1))
    dx, dw = torch.autograd.grad(y, [xt, wt], torch.tensor(cots["y"], dtype=torch.float64))
    assert relative_error(outs["y"], y.detach().numpy()) <= TOLERANCE
    assert relative_error(grads["image"], dx.numpy()) <= TOLERANCE
    assert relative_error(grads["w"], dw.numpy()) <= TOLERANCE
    assert [o.name for o in backward.model.graph.output] == [
        backward.gradients["image"], backward.gradients["w"], backward.outputs["y"]
    ]


def test_without_keep_outputs_only_gradients_are_returned() -> None:
    backward = build_backward(_conv_relu_model(), ["w"])
    assert backward.outputs == {}
    assert [o.name for o in backward.model.graph.output] == [backward.gradients["w"]]
    # The weight stays an input; dX of the first conv is not computed (nothing asks for it).
    assert [i.name for i in backward.model.graph.input] == ["image", "w", backward.cotangents["y"]]
    assert [n.op_type for n in backward.model.graph.node].count("ConvTranspose") == 0
    convs = [n for n in backward.model.graph.node if n.op_type == "Conv"]
    assert len(convs) == 1  # the recomputed forward conv only


def test_unused_input_gets_no_gradient_and_unreachable_wrt_gets_zeros() -> None:
    shape = [2, 3]
    model = make_model(
        [helper.make_node("Mul", ["a", "b"], ["y"]), helper.make_node("Neg", ["c"], ["z"])],
        [value("a", shape), value("b", shape), value("c", shape), value("unused", shape)],
        [value("y", shape), value("z", shape)],
    )
    backward = build_backward(model, ["a", "unused"], outputs=["y"])
    assert set(backward.gradients) == {"a", "unused"}
    assert set(backward.cotangents) == {"y"}
    # Only the forward nodes that are needed are kept: Neg(c) is not.
    assert "Neg" not in {n.op_type for n in backward.model.graph.node}
    feeds = {name: rand(*shape, seed=i) for i, name in enumerate("abc")}
    feeds["unused"] = rand(*shape, seed=9)
    grads, _, cots = run(backward, feeds)
    np.testing.assert_array_equal(grads["unused"], np.zeros(shape, np.float32))
    assert relative_error(grads["a"], cots["y"] * feeds["b"]) <= TOLERANCE


def test_gradient_wrt_intermediate_tensor() -> None:
    model = _conv_relu_model()
    backward = build_backward(model, ["c"])
    image = rand(1, 3, 8, 8, seed=4)
    grads, _, cots = run(backward, {"image": image})
    conv = torch.nn.functional.conv2d(
        torch.tensor(image), torch.tensor(numpy_helper.to_array(model.graph.initializer[0])),
        padding=1,
    ).numpy()
    assert relative_error(grads["c"], np.where(conv > 0, cots["y"], 0)) <= TOLERANCE


def test_missing_rule_names_op_and_node() -> None:
    model = make_model(
        [helper.make_node("Relu", ["x"], ["r"]),
         helper.make_node("LRN", ["r"], ["y"], size=3, name="the_lrn")],
        [value("x", [1, 3, 4, 4])], [value("y", [1, 3, 4, 4])],
    )
    with pytest.raises(UnsupportedOpError, match=r"LRN.*the_lrn"):
        build_backward(model, ["x"])


def test_unknown_shape_is_an_error() -> None:
    model = make_model(
        [helper.make_node("Relu", ["x"], ["y"])],
        [value("x", ["N", 3])], [value("y", ["N", 3])],
    )
    with pytest.raises(StreamcError, match="not static"):
        build_backward(model, ["x"])


def test_unknown_wrt_is_an_error() -> None:
    with pytest.raises(StreamcError, match="nope"):
        build_backward(_conv_relu_model(), ["nope"])


def test_training_mode_batchnorm_is_refused() -> None:
    c = 3
    params = [numpy_helper.from_array(np.ones(c, np.float32), n) for n in ("s", "b", "m", "v")]
    model = make_model(
        [helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"],
                          training_mode=1, name="bn1")],
        [value("x", [2, c, 4, 4])], [value("y", [2, c, 4, 4])], params,
    )
    with pytest.raises(StreamcError, match=r"bn1.*training mode.*eval"):
        build_backward(model, ["s"])


def test_old_opset_is_upgraded_to_17() -> None:
    model = make_model(
        [helper.make_node("Unsqueeze", ["x"], ["u"], axes=[0]),
         helper.make_node("ReduceSum", ["u"], ["y"], axes=[2], keepdims=0)],
        [value("x", [2, 3])], [value("y", [1, 2])], opset=11,
    )
    backward = build_backward(model, ["x"])
    assert {o.version for o in backward.model.opset_import if o.domain == ""} == {17}
    grads, _, cots = run(backward, {"x": rand(2, 3)})
    assert relative_error(grads["x"], np.repeat(cots["y"].reshape(2, 1), 3, axis=1)) <= TOLERANCE


def test_shape_computations_are_folded() -> None:
    """Pads computed from Shape (as torch exports nn.ZeroPad2d) are folded to constants."""
    model = make_model(
        [helper.make_node("Shape", ["x"], ["s"]),
         helper.make_node("Gather", ["s", "idx"], ["h"], axis=0),
         helper.make_node("Sub", ["h", "three"], ["one"]),
         helper.make_node("Concat", ["zeros2", "one", "zero1", "zeros2", "one", "zero1"],
                          ["pads"], axis=0),
         helper.make_node("Pad", ["x", "pads"], ["y"])],
        [value("x", [1, 2, 4, 5])], [value("y", [1, 2, 6, 5])],
        [numpy_helper.from_array(np.array([2], np.int64), "idx"),
         numpy_helper.from_array(np.array([3], np.int64), "three"),
         numpy_helper.from_array(np.zeros(2, np.int64), "zeros2"),
         numpy_helper.from_array(np.zeros(1, np.int64), "zero1")],
    )
    backward = build_backward(model, ["x"])
    grads, _, cots = run(backward, {"x": rand(1, 2, 4, 5)})
    assert relative_error(grads["x"], cots["y"][:, :, 1:5, :]) <= TOLERANCE


def test_constant_node_gets_no_gradient() -> None:
    model = make_model(
        [helper.make_node("Constant", [], ["k"],
                          value=numpy_helper.from_array(np.full([3], 2.0, np.float32))),
         helper.make_node("Mul", ["x", "k"], ["y"])],
        [value("x", [2, 3])], [value("y", [2, 3])],
    )
    grads, _, cots = run(build_backward(model, ["x"]), {"x": rand(2, 3)})
    assert relative_error(grads["x"], 2 * cots["y"]) <= TOLERANCE


def test_output_that_is_also_consumed_sums_both_cotangents() -> None:
    model = make_model(
        [helper.make_node("Relu", ["x"], ["h"]), helper.make_node("Neg", ["h"], ["y"])],
        [value("x", [4])], [value("h", [4]), value("y", [4])],
    )
    x = np.array([1.0, -1.0, 2.0, -3.0], np.float32)
    grads, _, cots = run(build_backward(model, ["x"]), {"x": x})
    assert relative_error(grads["x"], np.where(x > 0, cots["h"] - cots["y"], 0)) <= TOLERANCE


# --------------------------------------------------------------------------------------------
# Whole networks exported from torch


class SmallNet(nn.Module):
    """conv+BN(eval)+relu, maxpool, a residual Add, a channel Concat, nearest upsample, GAP,
    Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.pool = nn.MaxPool2d(3, 2, padding=1)
        self.conv_a = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn_a = nn.BatchNorm2d(8)
        self.down = nn.Conv2d(8, 6, 3, stride=2, padding=1)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.mix = nn.Conv2d(14, 5, 1)
        self.prelu = nn.PReLU(5)
        self.fc = nn.Linear(5, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.bn(self.stem(x))))
        x = torch.relu(x + self.bn_a(self.conv_a(x)))
        y = self.up(torch.relu(self.down(x)))
        x = self.prelu(self.mix(torch.cat([x, y], dim=1)))
        return self.fc(x.mean((2, 3)))


def _randomise_batchnorm(module: nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
                m.bias.copy_(0.2 * torch.randn(m.num_features, generator=generator))
                m.running_mean.copy_(0.2 * torch.randn(m.num_features, generator=generator))
                m.running_var.copy_(torch.rand(m.num_features, generator=generator) + 0.5)


def check_against_torch(module: nn.Module, model: onnx.ModelProto, image: np.ndarray) -> None:
    """Gradients of sum(logits ⊙ c) w.r.t. every trainable initializer and the image."""
    trainable = trainable_initializers(model)
    params = dict(module.named_parameters())
    assert set(trainable) == set(params), (set(trainable) ^ set(params))
    output = model.graph.output[0].name
    backward = build_backward(model, ["image", *trainable], keep_outputs=True)
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    grads, outs, cots = run(backward, {"image": image, **{w: inits[w] for w in trainable}})
    reference = copy.deepcopy(module).double()
    xt = torch.tensor(image, dtype=torch.float64, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logits = reference(xt)
    names = list(params)
    expected = torch.autograd.grad(
        logits, [xt] + [dict(reference.named_parameters())[n] for n in names],
        torch.tensor(cots[output], dtype=torch.float64),
    )
    assert relative_error(outs[output], logits.detach().numpy()) <= TOLERANCE
    assert relative_error(grads["image"], expected[0].numpy()) <= TOLERANCE, "image"
    for name, grad in zip(names, expected[1:], strict=True):
        error = relative_error(grads[name], grad.numpy())
        assert error <= TOLERANCE, f"{name}: relative error {error:.2e}"


def test_small_network_matches_torch() -> None:
    torch.manual_seed(0)
    module = SmallNet()
    _randomise_batchnorm(module, 1)
    model = export_torch(module, (2, 3, 16, 16), dynamic=False)
    assert "BatchNormalization" in {n.op_type for n in model.graph.node}
    check_against_torch(module, model, rand(2, 3, 16, 16, seed=5))


def test_trainable_initializers_skip_statistics() -> None:
    torch.manual_seed(0)
    module = SmallNet()
    _randomise_batchnorm(module, 1)
    trainable = trainable_initializers(export_torch(module, (1, 3, 16, 16), dynamic=False))
    assert "bn.weight" in trainable and "bn.bias" in trainable and "fc.weight" in trainable
    assert not any("running" in name for name in trainable)


@pytest.mark.parametrize("name", zoo.LOCAL_NAMES)
def test_zoo_model_matches_torch(name: str) -> None:
    zm = zoo.build(name)
    check_against_torch(zm.module, zm.onnx_model, zm.image(seed=3))
