"""streamc: compile ONNX CNNs into exact tiled training programs for very large images.

    analysis = streamc.analyze("model.onnx", image=(8192, 8192))
    program = streamc.compile("model.onnx", tile=2048, image=(8192, 8192))
    program.save("model.streamc"); program = streamc.load("model.streamc")
"""

from streamc.analysis import Analysis, analyze
from streamc.compiler import compile
from streamc.errors import StreamcError
from streamc.program import Program, load

__version__ = "0.1.0"

__all__ = [
    "AnySizeModel",
    "Analysis",
    "Program",
    "StreamcError",
    "StreamingModel",
    "analyze",
    "compile",
    "export_torch",
    "load",
    "__version__",
]


def __getattr__(name: str):
    # The runtime and the exporter import torch: load them only when they are asked for.
    if name == "StreamingModel":
        from streamc.runtime.module import StreamingModel

        return StreamingModel
    if name == "AnySizeModel":
        from streamc.runtime.any_size import AnySizeModel

        return AnySizeModel
    if name == "export_torch":
        from streamc.export import export_torch

        return export_torch
    raise AttributeError(f"module 'streamc' has no attribute {name!r}")
