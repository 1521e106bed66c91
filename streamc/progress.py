"""Progress bars for long loops (tiles, candidates), shown only where someone watches."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

#: Loops shorter than this show no bar.
MIN_STEPS = 8


def stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


@contextmanager
def progress_bar(total: int, desc: str, enabled: bool | None = None, unit: str = "tile"
                 ) -> Iterator[Callable[[], None]]:
    """A tqdm bar of ``total`` steps on stderr, yielding the function that advances it.

    ``enabled``: True or False forces it; None (default) shows it for loops of at least
    :data:`MIN_STEPS` when stderr is a terminal.
    """
    show = enabled if enabled is not None else total >= MIN_STEPS and stderr_is_terminal()
    if not show:
        yield lambda: None
        return
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=f"streamc {desc}", unit=unit, leave=False, dynamic_ncols=True)
    try:
        yield lambda: bar.update(1)
    finally:
        bar.close()
