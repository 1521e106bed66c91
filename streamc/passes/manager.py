"""The pass contract and the manager that runs passes.

A :class:`Pass` names what it reads from the compile state, the one entry it writes, the
function that computes it, and the invariant check of its result. :class:`PassManager` runs
passes in order: it checks that what a pass reads is there, runs it, always runs its check
(a pass cannot be used without its invariants being verified), and stores the result. Any
failure of a pass or its check surfaces as one :class:`~streamc.errors.CompileError` whose
message starts with the pass name.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from streamc.errors import CompileError, StreamcError

State = dict[str, Any]


@dataclass(frozen=True)
class Pass:
    """One compiler pass.

    ``run(state)`` returns the value stored under ``writes``; it may only read the entries in
    ``reads``. ``check(state, result)`` raises when the result breaks the pass's invariants.
    """

    name: str
    reads: tuple[str, ...]
    writes: str
    run: Callable[[Mapping[str, Any]], Any]
    check: Callable[[Mapping[str, Any], Any], None] | None = None
    doc: str = ""


@dataclass
class PassManager:
    """Runs :class:`Pass` es in order over one compile state; records each pass's time."""

    passes: list[Pass]
    seconds: dict[str, float] = field(default_factory=dict)

    def run(self, state: State) -> State:
        for p in self.passes:
            missing = [r for r in p.reads if r not in state]
            if missing:
                raise CompileError(
                    f"{p.name}: internal error: it reads {missing}, which no earlier pass "
                    "wrote; please report this.")
            view = _ReadOnly(state, p.reads, p.name)
            started = time.perf_counter()
            try:
                result = p.run(view)
                if p.check is not None:
                    p.check(view, result)
            except CompileError as exc:
                raise _named(p.name, exc) from exc.__cause__
            except (StreamcError, ValueError) as exc:
                raise _named(p.name, exc) from exc
            self.seconds[p.name] = time.perf_counter() - started
            state[p.writes] = result
        return state

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.passes]


def _named(name: str, exc: Exception) -> CompileError:
    """``exc`` as a CompileError whose message names the pass; a CompileError keeps its class,
    so a caller can tell kinds of failure apart."""
    message = str(exc)
    if message.startswith(f"{name}: "):
        return exc if isinstance(exc, CompileError) else CompileError(message)
    kind = type(exc) if isinstance(exc, CompileError) else CompileError
    return kind(f"{name}: {message}")


class _ReadOnly(Mapping[str, Any]):
    """The compile state as one pass may see it: only the entries it declared."""

    def __init__(self, state: State, allowed: Iterable[str], name: str) -> None:
        self._state = state
        self._allowed = frozenset(allowed)
        self._name = name

    def __getitem__(self, key: str) -> Any:
        if key not in self._allowed:
            raise CompileError(f"{self._name}: internal error: reads {key!r} without declaring "
                               "it; please report this.")
        return self._state[key]

    def __iter__(self):
        return (k for k in self._state if k in self._allowed)

    def __len__(self) -> int:
        return sum(1 for _ in self)
