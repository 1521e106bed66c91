"""Memory planning: how much memory one training step of a program needs, before it runs.

- :mod:`~streamc.passes.memory.allocator`: ONNX Runtime's CPU allocation planner, modelled
  (the peak of one graph run);
- :mod:`~streamc.passes.memory.step`: one training step of a compiled program under a runtime
  policy (:func:`plan_program`);
- :mod:`~streamc.passes.memory.conventional`: conventional full-image training of the same
  model (:func:`plan_conventional`).

The per-op facts they use (buffer sharing, workspace, what autograd keeps) are in
:mod:`streamc.ops.memory`.
"""

from streamc.passes.memory.allocator import GraphPlan, execution_order, ort_optimized, plan_graph
from streamc.passes.memory.conventional import (
    ConventionalPlan,
    head_memory,
    plan_conventional,
)
from streamc.passes.memory.step import ClassPlan, MemoryPlan, Resident, plan_program

__all__ = [
    "ClassPlan",
    "ConventionalPlan",
    "GraphPlan",
    "MemoryPlan",
    "Resident",
    "execution_order",
    "head_memory",
    "ort_optimized",
    "plan_conventional",
    "plan_graph",
    "plan_program",
]
