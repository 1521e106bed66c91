"""Per-op facts that are plain sets: which ops are never folded, which pass a tensor through
unchanged, which input slots hold runtime-owned buffers. Every pass reads them from here."""

from __future__ import annotations

import onnx

FLOAT_TYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE,
                         onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16})

#: Ops whose result must never be folded into a constant, even when every input is constant:
#: their value is random.
NEVER_FOLD = frozenset({
    "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
    "Bernoulli",
})

#: Ops that only reshape, relabel or re-type their first input: a weight seen through them is
#: still that weight (torch feeds PReLU's slope through an Unsqueeze).
PASS_THROUGH = frozenset({
    "Unsqueeze", "Squeeze", "Reshape", "Flatten", "Identity", "Cast", "Transpose", "Expand",
})

#: (op type, input slot) of non-trainable state the runtime owns as buffers.
BUFFER_SLOTS = frozenset({("BatchNormalization", 3), ("BatchNormalization", 4)})

#: Window ops with a ``ceil_mode`` attribute.
CEIL_MODE_POOLS = frozenset({"MaxPool", "AveragePool", "LpPool"})

#: Ops with a bias operand that is trainable when the other operand is this op's output
#: (``Add(MatMul(x, W), b)``, a Linear layer exported without Gemm).
BIAS_AFTER = frozenset({"MatMul"})

#: Readers that make ONNX Runtime 1.32 (EliminateIdentity with Pad fusion) reject a graph in
#: which a tensor feeds both them and an Identity to a graph output.
IDENTITY_OUTPUT_UNSAFE_READERS = frozenset({"Pad"})

#: Ops the torch exporter writes when it merges initializers of equal value: an alias of one
#: weight under another name.
ALIAS_NODES = frozenset({"Identity"})
