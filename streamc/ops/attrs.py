"""Reading and writing ONNX node attributes: the one reader every table and pass uses."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

DEFAULT_DOMAINS = ("", "ai.onnx")


def attributes(node: onnx.NodeProto) -> dict[str, Any]:
    """A node's attributes as plain Python values (bytes decoded to str)."""
    out = {}
    for a in node.attribute:
        value = helper.get_attribute_value(a)
        out[a.name] = value.decode() if isinstance(value, bytes) else value
    return out


def attribute(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    """The value of attribute ``name`` of ``node`` (strings decoded), or ``default``."""
    for a in node.attribute:
        if a.name == name:
            value = helper.get_attribute_value(a)
            return value.decode() if isinstance(value, bytes) else value
    return default


def set_attribute(node: onnx.NodeProto, name: str, value: Any) -> None:
    """Replace (or add) attribute ``name`` of ``node``; ``value=None`` removes it."""
    for i, a in enumerate(node.attribute):
        if a.name == name:
            del node.attribute[i]
            break
    if value is not None:
        node.attribute.append(helper.make_attribute(name, value))


def is_default_domain(node: onnx.NodeProto) -> bool:
    return node.domain in DEFAULT_DOMAINS


def constant_value(node: onnx.NodeProto) -> np.ndarray | None:
    """The value of a ``Constant`` node (any of its value attributes), or None."""
    for a in node.attribute:
        if a.name == "value":
            return numpy_helper.to_array(a.t)
        if a.name in ("value_float", "value_int", "value_floats", "value_ints"):
            dtype = np.float32 if "float" in a.name else np.int64
            return np.asarray(helper.get_attribute_value(a), dtype=dtype)
    return None


def has_subgraph(node: onnx.NodeProto) -> bool:
    """Whether ``node`` carries a graph attribute (If, Loop, Scan bodies)."""
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
               for a in node.attribute)


def captured_names(node: onnx.NodeProto) -> set[str]:
    """Outer-scope tensors that ``node``'s subgraphs read (If/Loop/Scan bodies capture them
    without listing them as inputs)."""
    captured: set[str] = set()
    for a in node.attribute:
        graphs = [a.g] if a.type == onnx.AttributeProto.GRAPH else (
            list(a.graphs) if a.type == onnx.AttributeProto.GRAPHS else [])
        for graph in graphs:
            local = {i.name for i in graph.input} | {i.name for i in graph.initializer}
            for inner in graph.node:
                local.update(inner.output)
            for inner in graph.node:
                captured.update(n for n in inner.input if n and n not in local)
                captured.update(n for n in captured_names(inner) if n not in local)
    return captured
