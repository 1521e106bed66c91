"""Programs for any image size: compiled once per size, kept in memory and in a directory.

A dataset of slides mixes sizes, and a program is compiled for one. :class:`ProgramCache` gives
the program for a size, compiling it on first sight (about a second for ResNet-18) and keeping
it in memory (the most recently used few) and, with a ``directory``, on disk, where the next
process finds it. An entry is keyed by the model's SHA-256, the streamc and program format
versions, the grid end setting, the size, the tile and the mode, so a changed model or streamc
never gets a stale program; a cached program that fails its checksums is compiled again.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from streamc.analysis.analyze import analyze_checked
from streamc.compiler import GridEnd, ProgramMode, compile_analysis, source_of
from streamc.errors import ProgramError
from streamc.graph import load_model_serialized
from streamc.meta import FORMAT_VERSION
from streamc.passes.schedule import MAX_TILES
from streamc.program import Program, load
from streamc.units import parse_extent

Size = tuple[int, ...]


@dataclass
class CacheStats:
    """What a cache did: programs compiled, loaded from its directory and found in memory; the
    image sizes it was asked for, and the (size, mode) of every program it gave."""

    compiled: int = 0
    loaded: int = 0
    hits: int = 0
    compile_seconds: float = 0.0
    sizes: set[Size] = field(default_factory=set)
    used: set[tuple[Size, str]] = field(default_factory=set)

    @property
    def programs(self) -> int:
        """Distinct programs given out."""
        return len(self.used)

    def summary(self) -> str:
        """One line: how many programs the image sizes seen so far produced."""
        modes: dict[str, int] = {}
        for _, mode in self.used:
            modes[mode] = modes.get(mode, 0) + 1
        per_mode = ", ".join(f"{n} {mode}" for mode, n in sorted(modes.items()))
        return (f"{self.programs} program(s) ({per_mode or 'none'}) for {len(self.sizes)} image "
                f"size(s): {self.compiled} compiled ({self.compile_seconds:.1f} s), "
                f"{self.loaded} loaded from the cache directory, {self.hits} reused from memory")

    def to_dict(self) -> dict[str, Any]:
        return {"compiled": self.compiled, "loaded": self.loaded, "hits": self.hits,
                "compile_seconds": round(self.compile_seconds, 3), "programs": self.programs,
                "sizes": sorted(map(list, self.sizes)),
                "used": sorted([list(size), mode] for size, mode in self.used)}


class ProgramCache:
    """Programs of one model and tile for every image size asked for (module docstring).

    ``model``: an ONNX file or ModelProto whose spatial axes are dynamic. ``tile``: the largest
    tile (``2048``, ``"2048x1536"``). ``directory``: where programs persist between processes
    (None: memory only). ``max_in_memory``: programs kept in memory, least recently used
    dropped first. ``with_flops`` / ``with_memory_plan``: what each compile also computes (off:
    faster compiles). ``grid_end``: as :func:`streamc.compile` (``"auto"`` chooses per size).
    """

    def __init__(self, model: str | Path | onnx.ModelProto, tile: int | str | tuple[int, ...],
                 directory: str | Path | None = None, *, input: str | None = None,
                 max_in_memory: int = 8, max_tiles: int = MAX_TILES, with_flops: bool = False,
                 with_memory_plan: bool = False, grid_end: GridEnd = "auto") -> None:
        from streamc import __version__

        proto, serialized = load_model_serialized(model)
        self.model = proto
        self.source = source_of(model, serialized)
        self.tile = parse_extent(tile, "tile size") if isinstance(tile, str) else tile
        self.input = input
        self.directory = Path(directory).expanduser() if directory is not None else None
        self.max_in_memory = max(1, int(max_in_memory))
        self.max_tiles = max_tiles
        self.with_flops = with_flops
        self.with_memory_plan = with_memory_plan
        self.grid_end = grid_end
        digest = hashlib.sha256(serialized).hexdigest()
        ends = grid_end if grid_end is None or isinstance(grid_end, str) else ",".join(grid_end)
        self.key = hashlib.sha256(
            f"{digest}|streamc {__version__}|format {FORMAT_VERSION}|input {input}"
            f"|grid end {ends}".encode()
        ).hexdigest()[:24]
        self.stats = CacheStats()
        self._memory: OrderedDict[tuple[Size, str], Program] = OrderedDict()

    # -- where programs are ------------------------------------------------------------------------
    def _tile_text(self) -> str:
        tile = self.tile
        return "x".join(map(str, tile)) if isinstance(tile, (tuple, list)) else str(tile)

    def path(self, size: Size, mode: ProgramMode = "train") -> Path | None:
        """The directory of the cached program for ``size`` and ``mode`` (None without a
        cache directory)."""
        if self.directory is None:
            return None
        name = f"{'x'.join(map(str, size))}-tile{self._tile_text()}-{mode}.streamc"
        return self.directory / self.key / name

    # -- getting programs ------------------------------------------------------------------------
    def get(self, size: Size, mode: ProgramMode = "train") -> Program:
        """The program for images of spatial ``size``: from memory, else the cache directory,
        else compiled (and saved there). An inference request takes a training program of that
        size when one is at hand (it runs forward only), before compiling one."""
        size = tuple(int(d) for d in size)
        self.stats.sizes.add(size)
        candidates = [mode] + (["train"] if mode == "inference" else [])
        for wanted in candidates:
            program = self._memory.get((size, wanted))
            if program is not None:
                self._memory.move_to_end((size, wanted))
                self.stats.hits += 1
                self.stats.used.add((size, wanted))
                return program
        for wanted in candidates:
            program = self._load(size, wanted)
            if program is not None:
                self.stats.loaded += 1
                return self._remember(size, wanted, program)
        return self._remember(size, mode, self._compile(size, mode))

    def _load(self, size: Size, mode: ProgramMode) -> Program | None:
        path = self.path(size, mode)
        if path is None or not path.is_dir():
            return None
        try:
            return load(path)
        except ProgramError:
            return None  # damaged or from another version: compiled again and replaced

    def _compile(self, size: Size, mode: ProgramMode) -> Program:
        started = time.perf_counter()
        analysis = analyze_checked(self.model, size, self.input)
        program = compile_analysis(analysis, self.tile, self.source, with_flops=self.with_flops,
                                   with_memory_plan=self.with_memory_plan,
                                   max_tiles=self.max_tiles, started=started, mode=mode,
                                   grid_end=self.grid_end)
        self.stats.compiled += 1
        self.stats.compile_seconds += time.perf_counter() - started
        path = self.path(size, mode)
        if path is not None:
            program.save(path, force=True)  # the cache's own entry (a damaged one is replaced)
        return program

    def _remember(self, size: Size, mode: str, program: Program) -> Program:
        self.stats.used.add((size, mode))
        self._memory[(size, mode)] = program
        self._memory.move_to_end((size, mode))
        while len(self._memory) > self.max_in_memory:
            self._memory.popitem(last=False)
        return program

    def __deepcopy__(self, memo: dict) -> ProgramCache:
        return self  # a cache is shared, never copied

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_memory"] = OrderedDict()  # programs are reloaded or recompiled where unpickled
        return state

    def __repr__(self) -> str:
        where = f", directory={str(self.directory)!r}" if self.directory else ""
        return f"ProgramCache(tile={self._tile_text()}{where}, {self.stats.summary()})"


__all__ = ["CacheStats", "ProgramCache"]
