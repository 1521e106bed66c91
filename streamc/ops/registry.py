"""A small registry keyed by ONNX op type and opset range.

Every transformation that streamc applies per op (locality and region transfer, VJP rules, FLOP
counts, ...) is one :class:`OpTable`. Rules are registered with a decorator next to their code::

    LOCALITY = OpTable("locality")

    @LOCALITY.register("Relu", "Sigmoid")
    def pointwise(...): ...

A lookup for an op that has no rule raises :class:`UnsupportedOpError` naming the table, the op
type and the node.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

from streamc.errors import UnsupportedOpError

R = TypeVar("R")

DEFAULT_DOMAIN = ""


@dataclass(frozen=True)
class _Entry(Generic[R]):
    since: int
    until: int | None
    rule: R


class OpTable(Generic[R]):
    """Rules keyed by (domain, op type), each valid for an opset range ``[since, until]``."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._rules: dict[tuple[str, str], list[_Entry[R]]] = {}

    def register(
        self,
        *op_types: str,
        since: int = 1,
        until: int | None = None,
        domain: str = DEFAULT_DOMAIN,
    ) -> Callable[[R], R]:
        """Decorator: register the decorated object as the rule for ``op_types``."""

        def decorate(rule: R) -> R:
            for op_type in op_types:
                self.add(op_type, rule, since=since, until=until, domain=domain)
            return rule

        return decorate

    def add(
        self,
        op_type: str,
        rule: R,
        *,
        since: int = 1,
        until: int | None = None,
        domain: str = DEFAULT_DOMAIN,
    ) -> None:
        self._rules.setdefault((_norm(domain), op_type), []).append(_Entry(since, until, rule))

    def get(self, op_type: str, opset: int | None = None, domain: str = DEFAULT_DOMAIN) -> R | None:
        """The rule for ``op_type`` at ``opset`` (latest registered if ``opset`` is None)."""
        entries = self._rules.get((_norm(domain), op_type), [])
        for entry in reversed(entries):
            if opset is None or (
                entry.since <= opset and (entry.until is None or opset <= entry.until)
            ):
                return entry.rule
        return None

    def lookup(
        self,
        op_type: str,
        opset: int | None = None,
        domain: str = DEFAULT_DOMAIN,
        node_name: str | None = None,
    ) -> R:
        """Like :meth:`get`, but raise a clear :class:`UnsupportedOpError` when there is no rule."""
        rule = self.get(op_type, opset, domain)
        if rule is None:
            where = f" (node {node_name!r})" if node_name else ""
            at = f" at opset {opset}" if opset is not None else ""
            raise UnsupportedOpError(
                f"streamc has no {self.name} rule for op {_qualified(domain, op_type)}{at}{where}."
            )
        return rule

    def __contains__(self, op_type: str) -> bool:
        return (DEFAULT_DOMAIN, op_type) in self._rules

    def op_types(self, domain: str = DEFAULT_DOMAIN) -> list[str]:
        """All op types with at least one rule in ``domain``."""
        return sorted(op for (dom, op) in self._rules if dom == _norm(domain))

    def items(self) -> Iterable[tuple[str, R]]:
        for (_dom, op), entries in self._rules.items():
            yield op, entries[-1].rule


def _norm(domain: str) -> str:
    return "" if domain in ("", "ai.onnx") else domain


def _qualified(domain: str, op_type: str) -> str:
    return op_type if _norm(domain) == "" else f"{domain}.{op_type}"
