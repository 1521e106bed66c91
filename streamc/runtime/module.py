"""Compiled programs as torch modules: :class:`StreamingModel`.

``model(image)`` streams the prefix tile by tile and runs the head on ONNX Runtime; its outputs
are torch tensors whose backward (a :class:`torch.autograd.Function`) runs the head's backward
graph and then every tile's backward graph, and hands the weight gradients to autograd, which
adds them into each parameter's ``.grad``. Any torch optimizer, LR scheduler, ``GradScaler``,
gradient accumulation or ``torch.distributed`` wrapper therefore works unchanged.

Parameter names. ONNX initializer names are torch ``state_dict`` keys with dots
(``'layer1.0.conv1.weight'``), which ``nn.Module`` does not accept as attribute names. Each
name is registered as a path of plain container modules (``layer1`` → ``0`` → ``conv1`` →
parameter ``weight``), so ``named_parameters()`` and ``state_dict()`` keys *are* the ONNX names
and ``model.load_state_dict(torch_twin.state_dict(), strict=False)`` works (``strict=False``
only because of buffers such as ``num_batches_tracked`` that the ONNX graph lacks). A name that
cannot form such a path (an empty segment such as ``'a..b'``, a segment that clashes with an
attribute of ``nn.Module`` or of this class such as ``'forward'``, or a name that is the prefix
of another) is registered under the container ``onnx_escaped`` with ``'.'`` written ``'%2E'``,
``'%'`` written ``'%25'`` and a ``'%'`` in front; its ``state_dict`` key is then
``'onnx_escaped.%<escaped name>'`` (``'a..b'`` → ``'onnx_escaped.%a%2E%2Eb'``).
:attr:`StreamingModel.onnx_parameters`, :attr:`~StreamingModel.onnx_buffers` and
:meth:`~StreamingModel.state_key` map ONNX names to tensors and keys in every case.

Trainable initializers (program.json ``parameters`` with ``trainable: true``) are
``nn.Parameter``; the others (BatchNorm running statistics) are buffers. The program computes
BatchNorm with its running statistics in both ``train()`` and ``eval()`` mode (the compiler
accepts only frozen BatchNorm), so the two modes compute the same thing.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from streamc.data.sources import ImageSource, is_image_source
from streamc.errors import InputError, StreamcError
from streamc.policy import RuntimePolicy, WeightMode
from streamc.program import Program, load
from streamc.runtime.interpreter import Interpreter, check_image
from streamc.runtime.options import RuntimeOptions
from streamc.runtime.providers import check_cuda
from streamc.runtime.torch_backend import TorchCpuBackend, TorchCudaBackend, torch_dtype_of_onnx
from streamc.runtime.weights import WeightSet, snapshot_weights
from streamc.runtime.workers import Workers

ESCAPED = "onnx_escaped"
MODEL_GRAPH = "graphs/model.onnx"


def escape(name: str) -> str:
    """The attribute name of ``name`` inside :data:`ESCAPED` (reversible; the leading ``%``
    keeps it clear of every ``nn.Module`` attribute, e.g. for a name ``'forward'``)."""
    return "%" + name.replace("%", "%25").replace(".", "%2E")


def unescape(key: str) -> str:
    """The ONNX name of an attribute name made by :func:`escape`."""
    return key[1:].replace("%2E", ".").replace("%25", "%")


class _Runtime:
    """The interpreter and the current weight snapshot; rebuilt for a new device, never
    pickled."""

    def __init__(self, program: Program, options: RuntimeOptions, progress: bool | None
                 ) -> None:
        self.program = program
        self.options = options
        self.progress = progress
        self._interpreter: Interpreter | None = None
        self._device: torch.device | None = None
        self.weights: WeightSet | None = None
        self.workers: Workers | None = None  # one worker of a tile-parallel run

    def interpreter(self, device: torch.device) -> Interpreter:
        if self._interpreter is None or self._device != device:
            self._interpreter = None
            self.weights = None
            backend_type = TorchCudaBackend if device.type == "cuda" else TorchCpuBackend
            backend = backend_type(self.program, self.options, device)
            self._interpreter = Interpreter(self.program, backend, self.progress, self.workers)
            self._device = device
        return self._interpreter

    def snapshot(self, tensors: Mapping[str, torch.Tensor]) -> WeightSet:
        """The weights to run with: a private copy, reused while the weights are unchanged, or
        with ``weights="inputs"`` the live tensors themselves (autograd checks their versions
        between forward and backward)."""
        if self.options.policy.weights == "inputs":
            return WeightSet({name: t.detach() for name, t in tensors.items()}, generation=0)
        self.weights = snapshot_weights(tensors, self.weights)
        return self.weights

    def __deepcopy__(self, memo: dict) -> _Runtime:
        clone = _Runtime(self.program, self.options, self.progress)
        clone.workers = self.workers
        return clone

    def __getstate__(self) -> dict:
        return {"program": self.program, "options": self.options, "progress": self.progress}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["program"], state["options"], state["progress"])


class _Prefix(torch.autograd.Function):
    """image, *weights -> the head's inputs (whole buffers); backward runs every stage's tile
    backward graphs and the global graphs' backward graphs."""

    @staticmethod
    def forward(ctx: Any, interpreter: Interpreter, weights: WeightSet, names: Sequence[str],
                image: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        cuts, state = interpreter.prefix_forward(image, weights)
        ctx.interpreter, ctx.weights, ctx.names, ctx.state = interpreter, weights, names, state
        ctx.image = (image.shape, image.dtype) if isinstance(image, torch.Tensor) else None
        ctx.save_for_backward(*tensors)  # lets autograd catch in-place weight changes
        return tuple(cuts)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, *cut_grads: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        tensors = ctx.saved_tensors
        state, ctx.state = ctx.state, None
        grads = ctx.interpreter.prefix_backward(state, ctx.weights, cut_grads)
        out = [_grad_for(grads.get(name), t) for name, t in zip(ctx.names, tensors)]
        image_grad = grads.get(ctx.interpreter.image_name)  # a saliency program's
        if image_grad is not None and ctx.needs_input_grad[3] and ctx.image is not None:
            image_grad = image_grad.to(dtype=ctx.image[1]).reshape(ctx.image[0])
        else:
            image_grad = None
        return (None, None, None, image_grad, *out)


class _Head(torch.autograd.Function):
    """*cuts, *weights -> model outputs; backward runs the head's backward graph."""

    @staticmethod
    def forward(ctx: Any, interpreter: Interpreter, weights: WeightSet, names: Sequence[str],
                n_cuts: int, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        cuts, tensors = args[:n_cuts], args[n_cuts:]
        outputs = interpreter.head_forward(list(cuts), weights)
        ctx.interpreter, ctx.weights, ctx.names, ctx.n_cuts = interpreter, weights, names, n_cuts
        ctx.save_for_backward(*cuts, *tensors)
        ctx.mark_non_differentiable(*[o for o in outputs if not o.is_floating_point()])
        return tuple(outputs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, *output_grads: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        saved = ctx.saved_tensors
        cuts, tensors = saved[:ctx.n_cuts], saved[ctx.n_cuts:]
        cut_grads, grads = ctx.interpreter.head_backward(list(cuts), ctx.weights,
                                                         list(output_grads))
        out = [_grad_for(grads.get(name), t) for name, t in zip(ctx.names, tensors)]
        return (None, None, None, None, *cut_grads, *out)


def _grad_for(grad: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    if grad is None or not like.requires_grad:
        return None
    return grad.to(dtype=like.dtype, device=like.device).reshape(like.shape)


class StreamingModel(nn.Module):
    """A compiled program as a trainable torch module (see the module docstring).

    ``program``: a :class:`~streamc.program.Program` or the path of a program directory.
    ``device``: ``"cpu"`` or ``"cuda"`` (``"cuda:1"``...), where the weights live and ORT runs;
    ``"cuda"`` needs a GPU and the ``onnxruntime-gpu`` wheel. ``providers``: explicit ORT
    providers, overriding the device's defaults. ``weights``: how ORT gets the weights:
    ``"initializers"`` (every session rebuilt once per optimizer step with the weights baked
    in, so ORT can fold BatchNorm, fuse and pre-pack), ``"inputs"`` (sessions built once,
    weights fed on every run) or ``"auto"`` (default: forward graphs fed, backward graphs
    baked only where ORT optimises them and they run often; :mod:`streamc.policy`).
    ``threads``: ORT intra-op threads (default ``torch.get_num_threads()``).
    ``gpu_mem_limit``: bytes for ORT's CUDA arena (default half the GPU). ``progress``: tqdm
    bars over tiles (default: only when stderr is a terminal). ``allocator`` (CPU memory):
    ``"arena"`` (default, the fastest) shares one ORT arena between all sessions, which keeps
    what it took and holds 1.2-1.9x the memory plan (1.25x at 4096², docs/memory.md);
    ``"system"`` turns the arena off and pins glibc's mmap threshold at 64 KiB, so every freed
    tensor goes back to the system and a step stays within the plan (1.00-1.16x measured), for
    steps 1.3-2.4x as long.
    ``keep_activations``: the tile whose backward runs right after its forward (the last one,
    or the only one) keeps its activations instead of recomputing them (default); False
    recomputes them like every other tile.

    Images are ``(N, C, *size)`` float32 tensors or arrays with the compiled channels and size,
    or lazy :class:`~streamc.data.sources.ImageSource` s of that shape (each tile's crop read on
    demand: the image is never held whole); ``N`` may be any multiple of the compiled batch
    (chunks run one after another). The image gets a gradient only from a saliency program
    (``compile(..., mode="saliency")``: then ``image.grad``, and no weight gradients); an
    inference program (``mode="inference"``) runs forward only and its outputs carry no
    gradient.
    """

    def __init__(self, program: Program | str | Path, device: str | torch.device = "cpu",
                 providers: Sequence[str | tuple[str, dict[str, Any]]] | None = None, *,
                 weights: WeightMode = "auto", threads: int | None = None,
                 gpu_mem_limit: int | None = None, progress: bool | None = None,
                 allocator: Literal["arena", "system"] = "arena",
                 keep_activations: bool = True) -> None:
        super().__init__()
        if not isinstance(program, Program):
            program = load(program)
        device = torch.device(device)
        if device.type == "cuda" and providers is None:
            check_cuda(device)
        elif device.type not in ("cpu", "cuda"):
            raise StreamcError(f"device {device} is not supported: use 'cpu' or 'cuda'.")
        if program.meta.input.elem_type != onnx.TensorProto.FLOAT:
            raise StreamcError(
                "the program's image input is not float32; the streamc runtime runs float32 "
                "programs: export the model with a float32 input."
            )
        self.program = program
        policy = RuntimePolicy(weights=weights, allocator=allocator,
                               keep_activations=keep_activations)
        self._runtime = _Runtime(
            program,
            RuntimeOptions(policy=policy, threads=threads, gpu_mem_limit=gpu_mem_limit,
                           providers=tuple(providers) if providers is not None else None),
            progress,
        )
        self._paths: dict[str, tuple[tuple[str, ...], str]] = {}
        self._trainable: list[str] = []
        self._buffers_onnx: list[str] = []
        for spec in program.meta.parameters:
            name = spec.name
            dtype = torch_dtype_of_onnx(spec.elem_type)
            if name in program.parameters:
                value = torch.from_numpy(np.array(program.parameters[name], copy=True))
            else:
                value = torch.zeros(spec.shape)
            value = value.to(dtype).reshape(spec.shape)
            self._register(name, value, spec.trainable)
        if device.type != "cpu":
            self.to(device)

    # -- parameters ----------------------------------------------------------------------------
    def _register(self, name: str, value: torch.Tensor, trainable: bool) -> None:
        path = self._module_path(name)
        if path is None:
            path = (ESCAPED, escape(name))
            if ESCAPED not in self._modules:
                self.add_module(ESCAPED, nn.Module())
        module: nn.Module = self
        for segment in path[:-1]:
            if segment not in module._modules:
                module.add_module(segment, nn.Module())
            module = module._modules[segment]  # type: ignore[assignment]
        leaf = path[-1]
        if trainable:
            module.register_parameter(leaf, nn.Parameter(value))
            self._trainable.append(name)
        else:
            module.register_buffer(leaf, value)
            self._buffers_onnx.append(name)
        self._paths[name] = (path[:-1], leaf)

    def _module_path(self, name: str) -> tuple[str, ...] | None:
        """The module path for ``name`` split on dots, or None when a segment cannot be used."""
        parts = tuple(name.split("."))
        if not all(parts):
            return None
        module: nn.Module | None = self
        for k, segment in enumerate(parts):
            last = k == len(parts) - 1
            if module is not None:
                if not last and segment in module._modules:
                    module = module._modules[segment]
                    continue
                if _taken(module, segment):
                    return None
                module = None  # the rest of the path is new containers
            elif hasattr(nn.Module, segment):
                return None
        return parts

    def _lookup(self, name: str) -> torch.Tensor:
        path, leaf = self._paths[name]
        module: nn.Module = self
        for segment in path:
            module = module._modules[segment]  # type: ignore[assignment]
        if leaf in module._parameters:
            return module._parameters[leaf]  # type: ignore[return-value]
        return module._buffers[leaf]  # type: ignore[return-value]

    def state_key(self, name: str) -> str:
        """The ``state_dict`` key of ONNX initializer ``name``."""
        path, leaf = self._paths[name]
        return ".".join((*path, leaf))

    @property
    def onnx_parameters(self) -> dict[str, nn.Parameter]:
        """Trainable tensors by ONNX initializer name."""
        return {name: self._lookup(name) for name in self._trainable}  # type: ignore[misc]

    @property
    def onnx_buffers(self) -> dict[str, torch.Tensor]:
        """Non-trainable tensors (BatchNorm statistics) by ONNX initializer name."""
        return {name: self._lookup(name) for name in self._buffers_onnx}

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {name: self._lookup(name) for name in self._paths}

    @property
    def device(self) -> torch.device:
        """Where the weights are (and where ONNX Runtime runs)."""
        for t in self._tensors().values():
            return t.device
        return torch.device("cpu")

    # -- running -------------------------------------------------------------------------------
    def forward(self, image: torch.Tensor | np.ndarray) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """The ONNX model's outputs (a tensor, or a tuple for several outputs)."""
        interpreter, weights, tensors, x, track = self._begin(image)
        names = list(tensors)
        if track:
            cuts = _Prefix.apply(interpreter, weights, names, x, *tensors.values())
            outputs = _Head.apply(interpreter, weights, names, len(cuts), *cuts,
                                  *tensors.values())
        else:
            with torch.no_grad():
                cuts = interpreter.prefix_forward(x, weights, keep=False)[0]
                outputs = interpreter.head_forward(cuts, weights)
        outputs = tuple(outputs)
        return outputs[0] if len(outputs) == 1 else outputs

    def stream(self, image: torch.Tensor | np.ndarray) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """Prefix only: what the head reads (the full cut tensor(s), or the pooled features
        where the head's global pool runs tile by tile: compile with ``reduce_final=False`` for
        the map); backpropagating into them runs the tiles' backward graphs (the head is not
        used). Where the grid was ended early (``program.meta.grid_end``, which the default
        ``grid_end="auto"`` may choose) these are the tensors it ended at: compile with
        ``grid_end=None`` for the network's last local features."""
        interpreter, weights, tensors, x, track = self._begin(image)
        if track:
            cuts = _Prefix.apply(interpreter, weights, list(tensors), x, *tensors.values())
        else:
            with torch.no_grad():
                cuts = interpreter.prefix_forward(x, weights, keep=False)[0]
        cuts = tuple(cuts)
        return cuts[0] if len(cuts) == 1 else cuts

    @property
    def cut_names(self) -> list[str]:
        """Names of the tensors :meth:`stream` returns, in order."""
        return self.program.meta.cut_names

    @property
    def output_names(self) -> list[str]:
        """Names of the ONNX model's outputs, in the order :meth:`forward` returns them."""
        return list(self.program.meta.outputs)

    @property
    def policy(self) -> RuntimePolicy:
        """The runtime policy this model runs with (sessions and memory plan follow it)."""
        return self._runtime.options.policy

    def memory_plan(self, optimizer_copies: int = 2):
        """The memory plan of one training step with this model's runtime policy (a
        :class:`~streamc.passes.memory.MemoryPlan`; without the conventional figure, which
        needs the source model)."""
        from streamc.passes.memory import plan_program

        return plan_program(self.program, policy=self.policy, optimizer_copies=optimizer_copies)

    def _begin(self, image: torch.Tensor | np.ndarray):
        tensors = self._tensors()
        device = self.device
        for name, t in tensors.items():
            if t.dtype != torch.float32:
                raise StreamcError(
                    f"parameter {name!r} is {t.dtype}: streamc programs run in float32; keep the "
                    "model in float32 (do not call .double() or .half() on it)."
                )
        x = self._check_image(image, device)
        interpreter = self._runtime.interpreter(device)
        weights = self._runtime.snapshot(tensors)
        wanted = any(t.requires_grad for t in tensors.values()) or \
            (isinstance(x, torch.Tensor) and x.requires_grad)
        track = torch.is_grad_enabled() and wanted and self.program.meta.mode != "inference"
        return interpreter, weights, tensors, x, track

    def _check_image(self, image: torch.Tensor | np.ndarray | ImageSource, device: torch.device
                     ) -> torch.Tensor | ImageSource:
        if is_image_source(image):
            check_image(self.program, image.shape, np.float32, True)
            return image
        if not isinstance(image, (np.ndarray, torch.Tensor)):
            raise InputError(
                f"the image must be a torch tensor or a numpy array (or an image source: "
                f"streamc.data.open_slide, ArraySource), not {type(image).__name__}."
            )
        check_image(self.program, image.shape, image.dtype,
                    image.dtype in (np.float32, torch.float32))
        if isinstance(image, np.ndarray):
            if not image.flags.writeable:
                image = image.copy()
            return torch.from_numpy(image).to(device)
        if image.device != device:
            raise InputError(
                f"the image is on {image.device} but the model is on {device}: move it with "
                f"image.to({str(device)!r})."
            )
        return image

    # -- torch plumbing ------------------------------------------------------------------------
    def _apply(self, fn: Any, recurse: bool = True) -> StreamingModel:
        result = super()._apply(fn, recurse)
        device = self.device
        if device.type == "cuda" and self._runtime.options.providers is None:
            check_cuda(device)
        return result

    def run_as_worker(self, workers: Workers | None) -> None:
        """Run only ``workers``' tiles and combine with the other workers of a tile-parallel
        run (:func:`streamc.runtime.distributed.setup` calls it); None: every tile."""
        self._runtime.workers = workers
        self._runtime._interpreter = None

    def invalidate(self) -> None:
        """Forget the built sessions and weight snapshot (they are rebuilt on the next call).

        Never needed for correctness: changed weights are detected by value before each call.
        """
        workers = self._runtime.workers
        self._runtime = _Runtime(self._runtime.program, self._runtime.options,
                                 self._runtime.progress)
        self._runtime.workers = workers

    def extra_repr(self) -> str:
        size = "x".join(map(str, self.program.image_size))
        return (f"image={size}, tiles={len(self.program.tiles)}, "
                f"classes={len(self.program.classes)}, weights={self.policy.weights!r}, "
                f"allocator={self.policy.allocator!r}")

    def __deepcopy__(self, memo: dict) -> StreamingModel:
        cls = type(self)
        clone = cls.__new__(cls)
        memo[id(self)] = clone
        for key, value in self.__dict__.items():
            if key == "program":
                clone.__dict__[key] = value  # immutable: share it
            else:
                clone.__dict__[key] = copy.deepcopy(value, memo)
        return clone

    # -- export --------------------------------------------------------------------------------
    def export_onnx(self, path: str | Path) -> Path:
        """Write the model's ONNX graph with the current weights; returns the path.

        The graph is the model stored in the program (``graphs/model.onnx``). Files over 2 GB
        put the weights in ``<name>.data`` beside it.
        """
        model = self._export_graph()
        values = {name: t.detach().cpu().numpy() for name, t in self._tensors().items()}
        _set_initializers(model, values)
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        size = sum(v.nbytes for v in values.values())
        if size > 1_800_000_000:
            onnx.save_model(model, target, save_as_external_data=True,
                            all_tensors_to_one_file=True, location=f"{target.name}.data")
        else:
            onnx.save_model(model, target)
        return target

    def _export_graph(self) -> onnx.ModelProto:
        model = onnx.ModelProto()
        model.CopyFrom(self.program.graph(self.program.meta.model))
        return model


def _taken(module: nn.Module, segment: str) -> bool:
    return (segment in module._parameters or segment in module._buffers
            or segment in module._modules or hasattr(type(module), segment)
            or segment in module.__dict__)


def _set_initializers(model: onnx.ModelProto, values: Mapping[str, np.ndarray]) -> None:
    """Give ``model`` the initializers in ``values`` (replacing them, or turning graph inputs of
    those names into initializers)."""
    graph = model.graph
    existing = {init.name: k for k, init in enumerate(graph.initializer)}
    for name, value in values.items():
        tensor = numpy_helper.from_array(np.ascontiguousarray(value), name)
        if name in existing:
            graph.initializer[existing[name]].CopyFrom(tensor)
        else:
            graph.initializer.append(tensor)
    inputs = [i for i in graph.input if i.name not in values]
    if len(inputs) != len(graph.input):
        del graph.input[:]
        graph.input.extend(inputs)


__all__ = ["ESCAPED", "StreamingModel", "escape", "unescape"]
