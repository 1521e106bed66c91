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

__all__ = ["Analysis", "Program", "StreamcError", "analyze", "compile", "load", "__version__"]
