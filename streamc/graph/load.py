"""Reading an ONNX model: load and check it, with one clear error for every way it can fail."""

from __future__ import annotations

from pathlib import Path

import onnx

from streamc.errors import ModelLoadError
from streamc.ops.facts import FLOAT_TYPES

__all__ = ["FLOAT_TYPES", "dims", "load_model", "load_model_serialized", "opset_version"]


def load_model(model: str | Path | onnx.ModelProto) -> onnx.ModelProto:
    """Read an ONNX model from a path (or take a ModelProto) and check it; clear errors only."""
    return load_model_serialized(model)[0]


def load_model_serialized(model: str | Path | onnx.ModelProto) -> tuple[onnx.ModelProto, bytes]:
    """:func:`load_model`, also returning the serialized model that the checker read."""
    if isinstance(model, onnx.ModelProto):
        proto = model
        where = "the given model"
    else:
        path = Path(model)
        where = str(path)
        if not path.exists():
            raise ModelLoadError(f"{path}: no such file.")
        if path.is_dir():
            raise ModelLoadError(f"{path} is a directory, not an ONNX model file.")
        try:
            proto = onnx.load(str(path), load_external_data=False)
        except Exception as exc:  # noqa: BLE001 - protobuf raises several unrelated types
            raise ModelLoadError(
                f"{path} is not a readable ONNX model ({type(exc).__name__}): "
                "pass a .onnx file exported with torch.onnx.export or similar."
            ) from None
        try:
            onnx.load_external_data_for_model(proto, str(path.parent))
        except Exception as exc:  # noqa: BLE001 - a missing or unreadable data file
            detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ModelLoadError(
                f"{path} keeps its weights in external data that cannot be read: {detail} "
                "Put the data file(s) beside the model, as when it was saved."
            ) from None
        if not proto.graph.node and not proto.graph.input:
            raise ModelLoadError(f"{path} is not an ONNX model (it parsed to an empty graph).")
    serialized = proto.SerializeToString()
    try:
        onnx.checker.check_model(serialized)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "invalid model"
        raise ModelLoadError(f"{where} fails the ONNX checker: {first}") from None
    except UnicodeDecodeError:  # a name or string attribute that is not UTF-8: damaged bytes
        raise ModelLoadError(
            f"{where} is damaged: it holds text that is not UTF-8 (a corrupt or truncated "
            "file?); export it again.") from None
    return proto, serialized


def opset_version(model: onnx.ModelProto) -> int:
    """The default-domain opset the model imports."""
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    return 1


def dims(value_info: onnx.ValueInfoProto) -> tuple[int | None, ...] | None:
    """The dimensions of a typed value (None for a symbolic one), or None without a shape."""
    t = value_info.type.tensor_type
    if not t.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim)
