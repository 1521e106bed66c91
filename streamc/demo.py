"""The embedded default model: a small ResNet-style CNN generated with onnx.helper.

It needs no download and no torch: a 7x7/2 stem with BatchNorm (inference form) and ReLU, a 3x3/2
max pool, a residual block, a stride-2 block with a 1x1/2 projection shortcut, global average
pooling and a linear classifier. Spatial axes are dynamic, so any image size works.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

DEMO_INPUT = "image"
DEMO_OUTPUT = "logits"


def demo_model(channels: int = 16, classes: int = 2, seed: int = 0) -> onnx.ModelProto:
    """A small ResNet-style classifier with random (seeded) weights and dynamic H, W."""
    rng = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []

    def weight(name: str, shape: tuple[int, ...], scale: float | None = None) -> str:
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        std = scale if scale is not None else float(np.sqrt(2.0 / fan_in))
        inits.append(numpy_helper.from_array(
            (rng.standard_normal(shape) * std).astype(np.float32), name))
        return name

    def conv(x: str, name: str, c_in: int, c_out: int, k: int, stride: int = 1) -> str:
        w = weight(f"{name}.weight", (c_out, c_in, k, k))
        out = f"{name}_out"
        pad = k // 2
        nodes.append(helper.make_node(
            "Conv", [x, w], [out], name=name, kernel_shape=[k, k], strides=[stride, stride],
            pads=[pad, pad, pad, pad]))
        return out

    def batchnorm(x: str, name: str, c: int) -> str:
        scale = weight(f"{name}.weight", (c,), 0.2)
        inits[-1] = numpy_helper.from_array(
            (1 + rng.standard_normal(c) * 0.1).astype(np.float32), scale)
        bias = weight(f"{name}.bias", (c,), 0.1)
        mean = weight(f"{name}.running_mean", (c,), 0.1)
        var = f"{name}.running_var"
        inits.append(numpy_helper.from_array(rng.uniform(0.5, 1.5, c).astype(np.float32), var))
        out = f"{name}_out"
        nodes.append(helper.make_node("BatchNormalization", [x, scale, bias, mean, var], [out],
                                      name=name))
        return out

    def relu(x: str, name: str) -> str:
        nodes.append(helper.make_node("Relu", [x], [f"{name}_out"], name=name))
        return f"{name}_out"

    c = channels
    x = relu(batchnorm(conv(DEMO_INPUT, "stem.conv", 3, c, 7, 2), "stem.bn", c), "stem.relu")
    nodes.append(helper.make_node("MaxPool", [x], ["pool_out"], name="stem.pool",
                                  kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]))
    x = "pool_out"
    # Residual block at stride 4.
    y = relu(batchnorm(conv(x, "block1.conv1", c, c, 3), "block1.bn1", c), "block1.relu1")
    y = batchnorm(conv(y, "block1.conv2", c, c, 3), "block1.bn2", c)
    nodes.append(helper.make_node("Add", [x, y], ["block1_sum"], name="block1.add"))
    x = relu("block1_sum", "block1.relu2")
    # Downsampling block to stride 8 with a projection shortcut.
    y = relu(batchnorm(conv(x, "block2.conv1", c, 2 * c, 3, 2), "block2.bn1", 2 * c),
             "block2.relu1")
    y = batchnorm(conv(y, "block2.conv2", 2 * c, 2 * c, 3), "block2.bn2", 2 * c)
    s = batchnorm(conv(x, "block2.shortcut", c, 2 * c, 1, 2), "block2.bn_shortcut", 2 * c)
    nodes.append(helper.make_node("Add", [s, y], ["block2_sum"], name="block2.add"))
    x = relu("block2_sum", "block2.relu2")
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["gap_out"], name="head.pool"))
    nodes.append(helper.make_node("Flatten", ["gap_out"], ["flat_out"], name="head.flatten",
                                  axis=1))
    fc_w = weight("fc.weight", (classes, 2 * c), float(np.sqrt(1.0 / (2 * c))))
    fc_b = weight("fc.bias", (classes,), 0.01)
    nodes.append(helper.make_node("Gemm", ["flat_out", fc_w, fc_b], [DEMO_OUTPUT],
                                  name="head.fc", transB=1))
    graph = helper.make_graph(
        nodes, "streamc_demo",
        [helper.make_tensor_value_info(DEMO_INPUT, TensorProto.FLOAT, [1, 3, "H", "W"])],
        [helper.make_tensor_value_info(DEMO_OUTPUT, TensorProto.FLOAT, [1, classes])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="streamc-demo")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model
