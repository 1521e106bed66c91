"""ONNX model -> a prepared, shape-inferred, constant-folded model and a networkx DAG over it.

:func:`load_model` reads and checks a model; :func:`prepare` fixes the image size (when given),
infers shapes and folds constant subgraphs; :class:`Graph` is the read-only view every analysis
and pass works on: producers, consumers, shapes, constants and a DAG of node names.
"""

from streamc.graph.fold import constant_values, drop_unused_initializers, inline_constants
from streamc.graph.load import FLOAT_TYPES, dims, load_model, load_model_serialized, opset_version
from streamc.graph.prepare import choose_image_input, image_like_inputs, prepare
from streamc.graph.view import Graph, InitializerArrays

__all__ = [
    "FLOAT_TYPES",
    "Graph",
    "InitializerArrays",
    "choose_image_input",
    "constant_values",
    "dims",
    "drop_unused_initializers",
    "image_like_inputs",
    "inline_constants",
    "load_model",
    "load_model_serialized",
    "opset_version",
    "prepare",
]
