"""What ONNX Runtime keeps for itself besides tensors: its start-up and each live session.

The memory plan (``streamc.passes.memory``) counts tensors, weights and, as an allowance, ORT's
own state: ``RUNTIME_ONCE`` per process and ``RUNTIME_PER_NODE`` per node of every session alive
(``streamc.passes.memory.allocator``). This script measures both in a fresh process per
program, with freed memory going back to the system (no CPU arena, glibc's mmap threshold
pinned at 64 KiB, as the ``lean`` setting of ``benchmarks/memory_plan_accuracy.py``):

- start-up: RSS growth from building and running a one-node session (environment, thread pools,
  kernel registry), numpy, torch and ORT already imported;
- per session: RSS growth from building each tile class's backward graph as the runtime does by
  default (unoptimised, weights fed) and running it once on zeros, the session kept alive and
  its outputs freed; divided by the graph's node count.

Usage::

    python benchmarks/runtime_overhead.py                   # ResNet-18 width 32 and 64
    python benchmarks/runtime_overhead.py --size 1024 --tile 640

Prints one JSON line per program and a summary (MiB, KiB per node).
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _rss() -> int:
    gc.collect()
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def child(program_dir: str) -> dict:
    """Start-up and per-session growth in this (fresh) process."""
    import numpy as np
    import onnxruntime as ort
    import torch
    from onnx import TensorProto, helper

    from streamc.program import load
    from streamc.runtime.allocators import tune_malloc

    tune_malloc(65536)
    program = load(program_dir)

    def options() -> ort.SessionOptions:
        so = ort.SessionOptions()
        so.enable_cpu_mem_arena = False
        so.enable_mem_pattern = False
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        so.log_severity_level = 3
        so.intra_op_num_threads = torch.get_num_threads()
        return so

    base = _rss()
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "x"], ["y"])], "one",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    kept = [ort.InferenceSession(model.SerializeToString(), options(),
                                 providers=["CPUExecutionProvider"])]
    kept[0].run(None, {"x": np.ones(1, np.float32)})
    startup = _rss() - base
    sessions = []
    for cls in program.classes:
        before = _rss()
        session = ort.InferenceSession(program.serialized(cls.backward), options(),
                                       providers=["CPUExecutionProvider"])
        feeds = {i.name: program.parameters[i.name] if i.name in program.parameters
                 else np.zeros([int(d) for d in i.shape], np.float32)
                 for i in session.get_inputs()}
        outputs = session.run(None, feeds)
        del outputs, feeds
        kept.append(session)
        sessions.append({"nodes": len(program.graph(cls.backward).graph.node),
                         "bytes": _rss() - before})
    return {"startup": startup, "sessions": sessions}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--tile", type=int, default=640)
    parser.add_argument("--widths", default="32,64")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child)))
        return

    from streamc.compiler import compile
    from streamc.export import export_torch
    from zoo import randomize_batchnorm, resnet18

    MiB, KiB = 2**20, 2**10
    with tempfile.TemporaryDirectory(prefix="streamc-overhead-") as tmp:
        for width in (int(w) for w in args.widths.split(",")):
            model = export_torch(randomize_batchnorm(resnet18(width=width)),
                                 (1, 3, args.size, args.size), dynamic=False)
            program = compile(model, tile=args.tile, image=(args.size, args.size),
                              with_flops=False, with_memory_plan=False)
            directory = Path(tmp) / f"w{width}"
            program.save(directory)
            proc = subprocess.run([sys.executable, __file__, "--child", str(directory)],
                                  capture_output=True, text=True, check=True)
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            rest = result["sessions"][1:]  # the first session also pays first-run costs
            per_node = sum(s["bytes"] for s in rest) / max(1, sum(s["nodes"] for s in rest))
            first = result["sessions"][0]
            print(json.dumps({"width": width, "size": args.size, "tile": args.tile, **result}))
            print(f"resnet18 w{width} {args.size}²/{args.tile}: start-up "
                  f"{result['startup'] / MiB:.1f} MiB; first backward session "
                  f"{first['bytes'] / MiB:.1f} MiB ({first['nodes']} nodes); the other "
                  f"{len(rest)}: {per_node / KiB:.2f} KiB per node", flush=True)


if __name__ == "__main__":
    main()
