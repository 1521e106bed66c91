"""Runtime: one interpreter of compiled programs over backends, and the torch module API.

:class:`~streamc.runtime.interpreter.Interpreter` walks a program's steps; a backend
(:mod:`streamc.runtime.backend`: numpy, the reference; :mod:`streamc.runtime.torch_backend`:
torch on CPU and CUDA) does the tensor work on ONNX Runtime sessions built by
:class:`~streamc.runtime.sessions.SessionPool`. ``StreamingModel`` (in
:mod:`streamc.runtime.module`) is the user-facing torch module.
"""
