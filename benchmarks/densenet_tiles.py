"""DenseNet-121 (receptive field ~2000 px) at 4096² with tiles smaller than its receptive field.

    PYTHONPATH=/work/shared/scripts python -m benchmarks.densenet_tiles --size 4096 --tile 512

Builds timm's ``densenet121`` (no pretrained weights, parameters randomised as in
:mod:`benchmarks.zoo_models`, 2 classes), exports it with dynamic spatial axes, and compiles it
at ``--size`` with ``--tile`` twice: recomputing halos (which must refuse a tile below the
receptive field, naming the least tile) and reusing them. Then one training step of the reused
program through :class:`~streamc.StreamingModel` (2 threads, cross-entropy, SGD), in this
process: seconds, peak resident memory growth (``VmHWM`` after resetting it), against the
memory plan. Needs timm 1.0.31 (see :mod:`benchmarks.zoo_models`). Results:
``benchmarks/results/densenet_tiles.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.proc_status import reset_peak, status_kb  # noqa: E402
from benchmarks.zoo_models import _import_timm  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" /
                                             "densenet_tiles.json"))
    args = parser.parse_args()
    import numpy as np
    import torch

    import streamc
    from streamc.compiler import compile as compile_program
    from streamc.errors import CompileError
    from streamc.export import export_torch
    from streamc.passes.memory import plan_program
    from streamc.runtime.module import StreamingModel
    from zoo import randomize_parameters

    torch.set_num_threads(2)
    torch.manual_seed(0)
    module = randomize_parameters(_import_timm().create_model("densenet121", pretrained=False,
                                                              num_classes=2)).eval()
    model = export_torch(module, (1, 3, 64, 64), dynamic=True)
    image = (args.size, args.size)
    analysis = streamc.analyze(model, image=image)
    field = max(analysis.tensors[c].receptive_field[0] for c in analysis.ends)
    record: dict = {"model": "timm densenet121", "size": args.size, "tile": args.tile,
                    "receptive_field": field, "machine": {"python": platform.python_version(),
                                                          "torch_threads": 2}}
    try:
        compile_program(model, args.tile, image=image, halo="recompute", with_flops=False,
                        with_memory_plan=False)
        record["recompute"] = "compiled"
    except CompileError as exc:
        record["recompute"] = str(exc)
    started = time.perf_counter()
    program = compile_program(model, args.tile, image=image)
    record.update(compile_s=round(time.perf_counter() - started, 1), tiles=len(program.tiles),
                  grid=list(program.meta.grid), classes=len(program.classes),
                  flop_overhead=program.meta.flops.overhead,
                  bands=sum(b.nbytes for b in program.meta.buffers if b.kind == "band"))
    plan = plan_program(program, optimizer_copies=0)
    record["plan_peak"] = plan.peak
    record["plan_without_image_and_parameters"] = (plan.peak - plan.resident.image
                                                   - plan.resident.parameters)
    print(json.dumps(record), flush=True)
    sm = StreamingModel(program, threads=2, progress=False)
    sm.load_state_dict(module.state_dict(), strict=False)
    del module
    x = torch.from_numpy(np.random.default_rng(0).standard_normal(
        (1, 3, *image)).astype(np.float32))
    optimizer = torch.optim.SGD(sm.parameters(), lr=1e-4)
    reset = reset_peak()
    base = status_kb("VmRSS") * 1024
    started = time.perf_counter()
    loss = torch.nn.functional.cross_entropy(sm(x), torch.tensor([1]))
    loss.backward()
    optimizer.step()
    record["step_s"] = round(time.perf_counter() - started, 1)
    record["loss"] = float(loss)
    grads = [p.grad for p in sm.parameters() if p.grad is not None]
    record["gradients_finite"] = bool(all(torch.isfinite(g).all() for g in grads))
    record["gradients"] = len(grads)
    if reset:
        record["peak_growth"] = status_kb("VmHWM") * 1024 - base
    Path(args.out).write_text(json.dumps(record, indent=1))
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
