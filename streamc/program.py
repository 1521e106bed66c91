"""The compiled artifact: a directory of ONNX graphs, parameters and ``program.json``.

Layout of a program directory::

    program.json         format version, sizes, tiles, cut tensors, parameters, checksums
    parameters.npz       initial parameter and buffer values (from the source model)
    graphs/*.onnx        tile forward/backward graph per shape class, head forward/backward

``program.json`` lists the SHA-256 of every other file and of its own content (without the
``checksum`` field); :func:`load` refuses a program whose version, files or checksums do not
match. :meth:`Program.save` writes into a temporary directory beside the target and swaps it
into place (:mod:`streamc.atomic_dir`), so an interrupted save never leaves a half-written
program behind, and it never replaces what is not a program unless asked to.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from streamc import atomic_dir
from streamc.errors import ProgramError
from streamc.meta import FORMAT, FORMAT_VERSION, ClassSpec, ProgramMeta, TileSpec, class_run_order


@dataclass(repr=False)
class Program:
    """A compiled tiled training program.

    ``meta`` describes it (:class:`~streamc.meta.ProgramMeta`, the content of ``program.json``);
    ``graphs`` maps a relative file name (``graphs/...onnx``) to its ModelProto; ``parameters``
    maps initializer names to their values; ``path`` is where it was saved or loaded from.
    """

    meta: ProgramMeta
    graphs: dict[str, onnx.ModelProto]
    parameters: dict[str, np.ndarray]
    path: Path | None = None
    _serialized: dict[str, bytes] = field(default_factory=dict)

    # -- convenient views of meta --------------------------------------------------------------
    @property
    def input_name(self) -> str:
        return self.meta.input.name

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.meta.input.shape

    @property
    def image_size(self) -> tuple[int, ...]:
        return self.meta.image_size

    @property
    def tiles(self) -> list[TileSpec]:
        return self.meta.tiles

    @property
    def classes(self) -> list[ClassSpec]:
        return self.meta.classes

    @property
    def cut_tensors(self) -> list[str]:
        return self.meta.cut_names

    @property
    def memory_plan(self) -> dict | None:
        """The memory plan stored at compile time (for the policy it names), as a dict."""
        return self.meta.memory_plan

    @property
    def class_order(self) -> list[int]:
        """Tile classes in the order the runtime runs them
        (:func:`~streamc.meta.class_run_order`)."""
        return class_run_order(self.meta.tiles)

    def graph(self, relative: str) -> onnx.ModelProto:
        return self.graphs[relative]

    def serialized(self, relative: str) -> bytes:
        """The graph's bytes (cached): what ONNX Runtime sessions are built from."""
        if relative not in self._serialized:
            self._serialized[relative] = self.graphs[relative].SerializeToString()
        return self._serialized[relative]

    def __repr__(self) -> str:
        meta = self.meta
        size = "x".join(map(str, meta.image_size))
        where = f", path={str(self.path)!r}" if self.path is not None else ""
        return (f"Program(image={size}, tile={'x'.join(map(str, meta.tile))}, "
                f"tiles={len(meta.tiles)}, classes={len(meta.classes)}, "
                f"cut_tensors={meta.cut_names}{where})")

    # -- persistence ---------------------------------------------------------------------------
    def save(self, path: str | Path, force: bool = False) -> Path:
        """Write the program directory atomically; returns its path.

        ``path`` may be new, or hold a streamc program (replaced), or an empty directory. A
        directory holding anything else is refused unless ``force`` (its content is then
        replaced); a file is never replaced. A crash at any moment leaves the old program or
        the new one (:mod:`streamc.atomic_dir`).
        """
        target = Path(path)
        check_target(target, force)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            atomic_dir.recover(target)
            tmp = atomic_dir.make_temp(target)
        except OSError as exc:
            raise _write_error(target, exc) from None
        try:
            self._write_into(tmp)
            atomic_dir.install(tmp, target)
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(exc, OSError):
                raise _write_error(target, exc) from None
            raise
        self.path = target
        return target

    def _write_into(self, directory: Path) -> None:
        files: dict[str, str] = {}
        (directory / "graphs").mkdir()
        for relative in sorted(self.graphs):
            data = self.serialized(relative)
            _write(directory / relative, data)
            files[relative] = _sha256(data)
        buffer = io.BytesIO()
        np.savez(buffer, **{k: np.ascontiguousarray(v) for k, v in self.parameters.items()})
        _write(directory / "parameters.npz", buffer.getvalue())
        files["parameters.npz"] = _sha256(buffer.getvalue())
        meta = self.meta.to_json()
        meta["files"] = files
        meta["checksum"] = _meta_checksum(meta)
        _write(directory / "program.json", json.dumps(meta, indent=1).encode())


def is_program_directory(path: Path) -> bool:
    """Whether ``path`` is a directory streamc wrote (its program.json says so), valid or not."""
    try:
        meta = json.loads((path / "program.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("format") == FORMAT


def check_target(target: Path, force: bool = False) -> None:
    """Refuse to write a program where it would replace what the user did not ask to replace:
    a file, the current directory, or (unless ``force``) a directory that is not a program."""
    resolved = target.resolve()
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise ProgramError(
            f"{target} is the current directory (or holds it): write the program into a new "
            "directory instead, e.g. -o model.streamc.")
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise ProgramError(
            f"{target} exists and is not a directory: a program is a directory; choose another "
            "output path (nothing was written).")
    if not target.is_dir() or is_program_directory(target):
        return
    content = sorted(p.name for p in target.iterdir())
    if content and not force:
        shown = ", ".join(content[:3]) + (f" and {len(content) - 3} more" if len(content) > 3
                                          else "")
        raise ProgramError(
            f"{target} is a directory that is not a streamc program (it holds {shown}); "
            "choose another output path, or pass --force (force=True) to replace its content.")


def _write_error(target: Path, exc: OSError) -> ProgramError:
    reason = exc.strerror or type(exc).__name__
    where = f" ({exc.filename})" if exc.filename else ""
    return ProgramError(f"cannot write the program to {target}: {reason}{where}.")


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _meta_checksum(meta: dict) -> str:
    body = {k: v for k, v in meta.items() if k != "checksum"}
    return _sha256(json.dumps(body, sort_keys=True).encode())


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load(path: str | Path) -> Program:
    """Load a program directory, checking format version and every checksum."""
    root = Path(path)
    meta_path = root / "program.json"
    if not root.exists():
        atomic_dir.recover(root)  # a save that died between its two renames
    if not root.is_dir():
        raise ProgramError(f"{root}: no such program directory (compile one with streamc compile).")
    if not meta_path.exists():
        raise ProgramError(f"{root} is not a streamc program: program.json is missing.")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as exc:
        raise ProgramError(
            f"{meta_path} is not valid JSON ({exc}); recompile the program."
        ) from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ProgramError(f"{meta_path} is not a streamc program description.")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ProgramError(
            f"{root} has program format version {meta.get('format_version')}, this streamc reads "
            f"version {FORMAT_VERSION}: recompile it with this version."
        )
    if meta.get("checksum") != _meta_checksum(meta):
        raise ProgramError(f"{meta_path} was altered after compilation (checksum mismatch); "
                           "recompile the program.")
    graphs: dict[str, onnx.ModelProto] = {}
    serialized: dict[str, bytes] = {}
    parameters: dict[str, np.ndarray] = {}
    for relative, digest in meta.get("files", {}).items():
        file = root / relative
        if not file.exists():
            raise ProgramError(f"{root} is incomplete: {relative} is missing; recompile it.")
        data = file.read_bytes()
        if _sha256(data) != digest:
            raise ProgramError(f"{root}: {relative} was altered or truncated (checksum mismatch); "
                               "recompile the program.")
        if relative.endswith(".onnx"):
            graphs[relative] = onnx.load_from_string(data)
            serialized[relative] = data
        elif relative == "parameters.npz":
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                parameters = {k: npz[k] for k in npz.files}
    described = ProgramMeta.from_json(meta, str(meta_path))
    missing = [f for f in described.graph_files() if f not in graphs]
    if missing:
        raise ProgramError(f"{root} is incomplete: {missing[0]} is not listed among its files; "
                           "recompile it.")
    return Program(described, graphs, parameters, root, serialized)
