"""A plain executor of compiled programs on ONNX Runtime, numpy in and out.

:class:`ProgramExecutor` runs exactly what the program says: for each tile, crop the image, run
its class's forward graph and write the kept regions into the full cut tensors; run the head;
run the head's backward graph; then for each tile, run its class's backward graph on the same
crop with the cotangent of its kept regions, and add the weight gradients up (DESIGN section 5).
It knows nothing about torch and is the plain reference (``streamc check`` uses it); the torch
API, :mod:`streamc.runtime.module`, runs the same schedule on torch tensors through
:mod:`streamc.runtime.engine` and :mod:`streamc.runtime.sessions` (device tensors, weights as
initializers).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from streamc.errors import InputError, StreamcError
from streamc.program import Program

Arrays = dict[str, np.ndarray]


def _region(box: Sequence[Sequence[int]]) -> tuple[slice, ...]:
    return (slice(None), slice(None)) + tuple(slice(a, b) for a, b in box)


@dataclass
class SessionFactory:
    """Builds ONNX Runtime sessions with one set of providers and options."""

    providers: Sequence[str | tuple[str, dict]] | None = None
    intra_op_threads: int | None = None

    def __call__(self, data: bytes):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        if self.intra_op_threads:
            options.intra_op_num_threads = self.intra_op_threads
        providers = list(self.providers or ["CPUExecutionProvider"])
        try:
            return ort.InferenceSession(data, options, providers=providers)
        except Exception as exc:  # ORT raises its own exception types
            raise StreamcError(f"ONNX Runtime could not load a program graph: {exc}") from None


class ProgramExecutor:
    """Runs a :class:`~streamc.program.Program`'s graphs tile by tile (numpy arrays)."""

    def __init__(self, program: Program, session_factory: Callable[[bytes], object] | None = None,
                 progress: Callable[[Iterable, str], Iterable] | None = None) -> None:
        self.program = program
        self._factory = session_factory or SessionFactory()
        self._sessions: dict[str, object] = {}
        self._progress = progress or (lambda it, _desc: it)

    def session(self, relative: str):
        if relative not in self._sessions:
            self._sessions[relative] = self._factory(self.program.serialized(relative))
        return self._sessions[relative]

    def check_image(self, image: np.ndarray) -> None:
        """Raise :class:`InputError` unless ``image`` is one compiled image (N, C, *size)."""
        expected = self.program.input_shape
        if not isinstance(image, np.ndarray):
            raise InputError(f"the image must be a numpy array or torch tensor, not {type(image)}.")
        if image.ndim != len(expected):
            raise InputError(
                f"the image has {image.ndim} axes, the program expects {len(expected)} "
                f"(shape {list(expected)})."
            )
        if image.shape[1] != expected[1]:
            raise InputError(
                f"the image has {image.shape[1]} channels, the program was compiled for "
                f"{expected[1]}."
            )
        if tuple(image.shape[2:]) != tuple(expected[2:]):
            size = "x".join(map(str, image.shape[2:]))
            compiled = "x".join(map(str, expected[2:]))
            raise InputError(
                f"the image is {size} but the program was compiled for {compiled}; compile "
                f"another program with --image {size}."
            )
        if image.shape[0] != expected[0]:
            raise InputError(
                f"the image batch is {image.shape[0]}, the program runs {expected[0]} at a time."
            )
        if image.dtype != np.float32:
            raise InputError(f"the image must be float32, not {image.dtype}.")

    # -- prefix --------------------------------------------------------------------------------
    def forward_prefix(self, image: np.ndarray, params: Mapping[str, np.ndarray]) -> Arrays:
        """The full cut tensors, stitched from every tile's kept regions."""
        self.check_image(image)
        meta = self.program.meta
        cuts = {c["name"]: np.zeros(c["shape"], dtype=np.float32) for c in meta["cut_tensors"]}
        for tile in self._progress(self.program.tiles, "forward"):
            cls = self.program.classes[tile["class"]]
            feeds = self._tile_feeds(image, tile, cls, params)
            session = self.session(cls["forward"])
            names = list(cls["outputs"].items())
            results = session.run([out for _, out in names], feeds)
            for (cut, _), value in zip(names, results):
                cuts[cut][_region(tile["kept"][cut])] = value
        return cuts

    def backward_prefix(self, image: np.ndarray, params: Mapping[str, np.ndarray],
                        cut_grads: Mapping[str, np.ndarray]) -> Arrays:
        """Gradients of the trainable prefix parameters, summed over tiles."""
        grads: Arrays = {}
        for tile in self._progress(self.program.tiles, "backward"):
            cls = self.program.classes[tile["class"]]
            if not cls["gradients"]:
                continue
            feeds = self._tile_feeds(image, tile, cls, params)
            for cut, name in cls["cotangents"].items():
                feeds[name] = np.ascontiguousarray(cut_grads[cut][_region(tile["kept"][cut])])
            session = self.session(cls["backward"])
            names = list(cls["gradients"].items())
            results = session.run([out for _, out in names], feeds)
            for (param, _), value in zip(names, results):
                if param in grads:
                    grads[param] += value
                else:
                    grads[param] = value
        return grads

    def _tile_feeds(self, image, tile, cls, params) -> Arrays:
        feeds = {self.program.input_name: np.ascontiguousarray(image[_region(tile["crop"])])}
        for name in cls["parameters"]:
            feeds[name] = params[name]
        return feeds

    # -- head ----------------------------------------------------------------------------------
    def forward_head(self, cuts: Mapping[str, np.ndarray], params: Mapping[str, np.ndarray]
                     ) -> Arrays:
        """The model's outputs from the full cut tensors."""
        head = self.program.meta["head"]
        session = self.session(head["forward"])
        feeds = self._head_feeds(session, cuts, params)
        names = list(head["outputs"].items())
        results = session.run([graph_name for _, graph_name in names], feeds)
        return {out: value for (out, _), value in zip(names, results)}

    def backward_head(self, cuts: Mapping[str, np.ndarray], params: Mapping[str, np.ndarray],
                      output_grads: Mapping[str, np.ndarray]) -> tuple[Arrays, Arrays]:
        """(gradients of the cut tensors, gradients of the head's trainable parameters)."""
        head = self.program.meta["head"]
        session = self.session(head["backward"])
        feeds = self._head_feeds(session, cuts, params)
        for out, graph_name in head["outputs"].items():
            cot = head["cotangents"].get(graph_name)
            if cot is None:
                continue
            grad = output_grads.get(out)
            if grad is None:
                shape = [d for d in self._input_shape(session, cot)]
                grad = np.zeros(shape, dtype=np.float32)
            feeds[cot] = np.ascontiguousarray(grad, dtype=np.float32)
        names = list(head["gradients"].items())
        results = session.run([n for _, n in names], feeds)
        cut_grads, param_grads = {}, {}
        for (wrt, _), value in zip(names, results):
            (cut_grads if wrt in head["inputs"] else param_grads)[wrt] = value
        return cut_grads, param_grads

    @staticmethod
    def _input_shape(session, name: str) -> list[int]:
        for i in session.get_inputs():
            if i.name == name:
                return list(i.shape)
        raise StreamcError(f"head backward graph has no input {name!r}")

    @staticmethod
    def _head_feeds(session, cuts, params) -> Arrays:
        feeds = {}
        for i in session.get_inputs():
            if i.name in cuts:
                feeds[i.name] = cuts[i.name]
            elif i.name in params:
                feeds[i.name] = params[i.name]
        return feeds

    # -- a whole step --------------------------------------------------------------------------
    def run(self, image: np.ndarray, params: Mapping[str, np.ndarray],
            output_grads: Mapping[str, np.ndarray] | None = None) -> tuple[Arrays, Arrays]:
        """Forward; with ``output_grads`` also backward. Returns (outputs, parameter gradients)."""
        cuts = self.forward_prefix(image, params)
        outputs = self.forward_head(cuts, params)
        if output_grads is None:
            return outputs, {}
        return outputs, self.backward(image, params, cuts, output_grads)

    def backward(self, image: np.ndarray, params: Mapping[str, np.ndarray],
                 cuts: Mapping[str, np.ndarray], output_grads: Mapping[str, np.ndarray]
                 ) -> Arrays:
        """Parameter gradients (head and tiles summed), given the forward's cut tensors."""
        cut_grads, grads = self.backward_head(cuts, params, output_grads)
        for name, value in self.backward_prefix(image, params, cut_grads).items():
            grads[name] = grads[name] + value if name in grads else value
        return grads
