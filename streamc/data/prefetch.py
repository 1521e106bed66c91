"""Reading an image source's crops ahead of the tiles that need them.

The interpreter knows, before a pass starts, every crop the pass will read and in which order
(:meth:`~streamc.runtime.interpreter.Interpreter.image_reads`). :class:`CropReader` reads them
on one background thread, ``depth`` crops ahead, while the current tile's graph runs (ONNX
Runtime, zlib/JPEG decoding and numpy's conversions release the GIL), so reading overlaps
compute. A request that is not the next one expected (a caller that changed its order) is read
synchronously: a wrong plan costs time, never a wrong crop.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from streamc.data.sources import ImageSource, Index

Key = tuple


def crop_key(index: Index) -> Key:
    """A hashable form of an index of slices (slices are unhashable before Python 3.12)."""
    return tuple((s.start, s.stop, s.step) if isinstance(s, slice) else s for s in index)


class CropReader:
    """Reads ``source`` at the indices of ``plan`` in order, ``depth`` crops ahead on a thread.

    ``read(index)`` returns ``source.read(index)``; use as a context manager (or call
    :meth:`close`) so the thread stops when the pass ends. ``seconds_waiting`` is how long the
    caller waited for crops that were not ready yet (the I/O that did not overlap compute).
    """

    def __init__(self, source: ImageSource, plan: Sequence[Index], depth: int = 1) -> None:
        self.source = source
        self._plan = deque(plan)
        self._pending: deque[tuple[Key, Future]] = deque()
        self._depth = max(0, int(depth))
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="streamc-crop") \
            if self._depth and self._plan else None
        self.seconds_waiting = 0.0
        self.prefetched = 0
        self.synchronous = 0
        self._fill()

    def _fill(self) -> None:
        while self._pool is not None and self._plan and len(self._pending) < self._depth:
            index = self._plan.popleft()
            self._pending.append((crop_key(index), self._pool.submit(self.source.read, index)))

    def read(self, index: Index) -> np.ndarray:
        """The crop at ``index``: prefetched when it is the next one planned."""
        import time

        key = crop_key(index)
        if self._pending and self._pending[0][0] == key:
            _, future = self._pending.popleft()
            self._fill()  # the next crop starts reading before this one is used
            started = time.perf_counter()
            crop = future.result()
            self.seconds_waiting += time.perf_counter() - started
            self.prefetched += 1
            return crop
        self.synchronous += 1
        started = time.perf_counter()
        crop = self.source.read(index)
        self.seconds_waiting += time.perf_counter() - started
        return crop

    def close(self) -> None:
        """Stop reading ahead (pending reads finish and are dropped)."""
        self._plan.clear()
        for _, future in self._pending:
            future.cancel()
        self._pending.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __enter__(self) -> CropReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["CropReader", "crop_key"]
