"""Per-op memory facts: element sizes, buffer sharing in ONNX Runtime's CPU kernels, kernel
workspace, and what reverse-mode autodiff keeps of each op for its backward pass.

:data:`ALIAS_OPS` and :data:`INPLACE_OPS` follow the kernel declarations of ONNX Runtime's CPU
provider; :data:`WORKSPACE` is the scratch memory a kernel allocates while it runs;
:data:`SAVED` is what torch's autograd keeps of a forward node (the conventional figure).
Every op with a VJP rule has a SAVED rule (a coverage test checks it).
"""

from __future__ import annotations

import math

import onnx

from streamc.ops.attrs import attributes
from streamc.ops.registry import OpTable

#: Bytes per element of each ONNX tensor element type.
ELEMENT_BYTES: dict[int, int] = {
    onnx.TensorProto.FLOAT: 4,
    onnx.TensorProto.UINT8: 1,
    onnx.TensorProto.INT8: 1,
    onnx.TensorProto.UINT16: 2,
    onnx.TensorProto.INT16: 2,
    onnx.TensorProto.INT32: 4,
    onnx.TensorProto.INT64: 8,
    onnx.TensorProto.BOOL: 1,
    onnx.TensorProto.FLOAT16: 2,
    onnx.TensorProto.DOUBLE: 8,
    onnx.TensorProto.UINT32: 4,
    onnx.TensorProto.UINT64: 8,
    onnx.TensorProto.BFLOAT16: 2,
}


def element_bytes(elem_type: int) -> int:
    """Bytes per element of an ONNX element type (4 when unknown)."""
    return ELEMENT_BYTES.get(elem_type, 4)


#: ONNX Runtime CPU kernels declared ``Alias(0, 0)``: the output is a view of input 0.
ALIAS_OPS = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Dropout"})
#: Kernels declared ``MayInplace(0, 0)``: the output may reuse input 0's buffer when it dies.
INPLACE_OPS = frozenset({
    "Relu", "LeakyRelu", "Sigmoid", "Tanh", "Elu", "Selu", "Celu", "HardSigmoid", "Softplus",
    "Softsign", "ThresholdedRelu", "HardSwish", "Scatter", "ScatterElements",
})

Shapes = dict[str, tuple[int, ...]]


#: Contract of a rule: ``rule(node, shapes) -> bytes`` of scratch memory the kernel allocates for
#: itself while it runs (freed when it returns). Ops without a rule need none.
WORKSPACE: OpTable = OpTable("memory workspace")


@WORKSPACE.register("ConvTranspose")
def conv_transpose_workspace(node: onnx.NodeProto, shapes: Shapes) -> int:
    """ORT CPU ConvTranspose: a column buffer of (C_out/group · prod(kernel)) × input pixels."""
    x, w = shapes.get(node.input[0]), shapes.get(node.input[1])
    if not x or not w:
        return 0
    return 4 * math.prod(w[1:]) * math.prod(x[2:])


@WORKSPACE.register("Conv")
def conv_workspace(node: onnx.NodeProto, shapes: Shapes) -> int:
    """MLAS convolution: im2col of the whole output only when there are more filters than
    output pixels; otherwise it works in small per-thread segments (or needs nothing)."""
    x, w, y = (shapes.get(node.input[0]), shapes.get(node.input[1]),
               shapes.get(node.output[0]))
    if not x or not w or not y:
        return 0
    attrs = attributes(node)
    group = int(attrs.get("group", 1))
    out_pixels = math.prod(y[2:])
    k = math.prod(w[1:])
    pointwise = (math.prod(w[2:]) == 1 and all(s == 1 for s in attrs.get("strides", [1]))
                 and not any(attrs.get("pads", [0])))
    if pointwise:
        return 0
    if w[0] // group > out_pixels:
        return 4 * out_pixels * k
    return 4 * 128 * 128  # one MLAS segment (MLAS_SGEMM_STRIDEN × STRIDEK floats)


#: Contract of a rule: ``rule(node, nbytes) -> (tensor names, extra bytes)``: what reverse-mode
#: autodiff keeps of a forward node for its backward pass, as torch's autograd does (used for the
#: conventional figure). Every op with a VJP rule has one.
SAVED: OpTable = OpTable("saved for backward")


@SAVED.register("Conv", "ConvTranspose", "Gemm", "MatMul", "Mul", "Div", "Pow", "PRelu", "Max",
                "Min")
def saves_inputs(node: onnx.NodeProto, nbytes: dict[str, int]) -> tuple[list[str], int]:
    return [t for t in node.input if t], 0


@SAVED.register("LayerNormalization", "BatchNormalization", "LeakyRelu", "Elu", "Selu",
                "Softplus", "HardSigmoid", "HardSwish", "Log", "Abs", "GlobalAveragePool",
                "AveragePool", "GlobalMaxPool", "Clip", "Erf", "Gelu", "Where")
def saves_first_input(node: onnx.NodeProto, nbytes: dict[str, int]) -> tuple[list[str], int]:
    return list(node.input[:1]), 0


@SAVED.register("Relu", "Sigmoid", "Tanh", "Exp", "Sqrt", "Reciprocal", "Softmax", "LogSoftmax")
def saves_output(node: onnx.NodeProto, nbytes: dict[str, int]) -> tuple[list[str], int]:
    return list(node.output[:1]), 0


@SAVED.register("LpPool", "ReduceMax", "ReduceMin")
def saves_input_and_output(node: onnx.NodeProto, nbytes: dict[str, int]
                           ) -> tuple[list[str], int]:
    return list(node.input[:1]) + list(node.output[:1]), 0


@SAVED.register("MaxPool")
def saves_input_and_indices(node: onnx.NodeProto, nbytes: dict[str, int]
                            ) -> tuple[list[str], int]:
    # The input, and int64 indices of the output's shape (twice a float32 output's bytes).
    return list(node.input[:1]), 2 * nbytes.get(node.output[0], 0)


@SAVED.register("Add", "Sub", "Neg", "Concat", "Split", "Slice", "Pad", "Reshape", "Flatten",
                "Squeeze", "Unsqueeze", "Identity", "Transpose", "Resize", "Upsample", "Dropout",
                "Cast", "Expand", "ReduceSum", "ReduceMean", "Shape", "Constant",
                "ConstantOfShape", "Size", "Sum", "Mean", "Greater", "Less", "Equal",
                "GreaterOrEqual", "LessOrEqual", "And", "Or", "Not")
def saves_nothing(node: onnx.NodeProto, nbytes: dict[str, int]) -> tuple[list[str], int]:
    return [], 0
