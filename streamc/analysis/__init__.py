"""Analysis of an ONNX model: locality split, region transfer, receptive fields, alignment."""

from streamc.analysis.analyze import Analysis, TensorInfo, analyze

__all__ = ["Analysis", "TensorInfo", "analyze"]
