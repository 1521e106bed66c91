"""Runtime: ONNX Runtime sessions, the tile engine, and the torch module API.

``StreamingModel`` (in :mod:`streamc.runtime.module`) is the user-facing torch module;
:class:`~streamc.runtime.executor.ProgramExecutor` is the numpy reference executor.
"""
