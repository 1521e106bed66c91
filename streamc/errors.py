"""Errors that streamc raises for bad input: each one is a sentence a user can act on."""

from __future__ import annotations


class StreamcError(Exception):
    """Base class: the CLI prints the message on one line and exits non-zero."""


class ModelLoadError(StreamcError):
    """The model file is missing, unreadable, or not a valid ONNX model."""


class UnsupportedModelError(StreamcError):
    """The model cannot be streamed: no image input, non-local first op, unsupported op..."""


class UnsupportedOpError(StreamcError):
    """A table has no rule for an op (names the op type and the node)."""


class CompileError(StreamcError):
    """The tiling compiler cannot emit a correct program for this request."""


class ProgramError(StreamcError):
    """A program directory is missing, partial, altered or of another format version."""


class InputError(StreamcError):
    """An image handed to the runtime does not match what the program was compiled for."""


class DistributedError(StreamcError):
    """Workers of a distributed run disagree (programs, settings) or a collective failed (a
    worker died, stopped or timed out); every worker raises it."""
