"""streamc: compile ONNX CNNs into exact tiled training programs for very large images."""

from streamc.analysis import Analysis, analyze
from streamc.errors import StreamcError

__version__ = "0.1.0"

__all__ = ["Analysis", "StreamcError", "analyze", "__version__"]
