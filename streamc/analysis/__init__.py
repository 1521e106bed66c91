"""Analysis of an ONNX model: locality split, region transfer, receptive fields, alignment."""

from streamc.analysis.analyze import Analysis, PrefixTensor, analyze

__all__ = ["Analysis", "PrefixTensor", "analyze"]
