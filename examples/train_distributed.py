"""Train with streamc on several processes: data-parallel, tile-parallel, or both.

Launch it with torchrun, as any torch.distributed script::

    # 2 processes, each its own images (DistributedDataParallel)
    torchrun --nproc-per-node 2 examples/train_distributed.py
    # 2 processes share every image: each runs half of its tiles
    torchrun --nproc-per-node 2 examples/train_distributed.py --tile-workers 2
    # 4 processes: 2 images at a time, each split between 2 processes
    torchrun --nproc-per-node 4 examples/train_distributed.py --tile-workers 2
    # GPUs (one process per GPU, NCCL, onnxruntime-gpu), and two machines of 8 GPUs
    torchrun --nproc-per-node 8 examples/train_distributed.py --device cuda
    torchrun --nnodes 2 --node-rank 0 --nproc-per-node 8 --master-addr HOST --master-port 29500 \\
        examples/train_distributed.py --device cuda --tile-workers 4

Every process builds the same network (seeded), exports and compiles it (about a second), so
no shared file system is needed; :func:`streamc.runtime.distributed.setup` checks that every
process compiled the same program, broadcasts rank 0's weights, and gives each process its
share of the tiles. The task is the one of ``train_synthetic.py``: a checkerboard in small
patches that only full resolution shows. ``--accumulate K`` sums the gradients of ``K``
micro-batches per optimizer step (``no_sync`` for all but the last).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from contextlib import nullcontext
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_synthetic import CheckerNet, calibrate_batchnorm, make_batch  # noqa: E402

from streamc.compiler import compile as compile_program  # noqa: E402
from streamc.errors import StreamcError  # noqa: E402
from streamc.export import export_torch  # noqa: E402
from streamc.runtime.distributed import setup  # noqa: E402
from streamc.runtime.module import StreamingModel  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="streamc on torch.distributed")
    parser.add_argument("--size", type=int, default=1024, help="image side (pixels)")
    parser.add_argument("--tile", type=int, default=384, help="largest tile side (pixels)")
    parser.add_argument("--tile-workers", type=int, default=1,
                        help="processes per image (tile-parallel); must divide the world size")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=2, help="images per micro-batch")
    parser.add_argument("--accumulate", type=int, default=1, help="micro-batches per step")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--timeout", type=float, default=300,
                        help="seconds a collective waits before every process stops")
    parser.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (nccl)")
    args = parser.parse_args(argv)

    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cpu")
    if args.device == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            timeout=timedelta(seconds=args.timeout))
    rank, world = dist.get_rank(), dist.get_world_size()
    say = print if rank == 0 else (lambda *a, **k: None)

    torch.manual_seed(0)  # the same network on every process
    net = CheckerNet()
    calibrate_batchnorm(net, np.random.default_rng(0))
    started = time.perf_counter()
    program = compile_program(export_torch(net, (1, 1, args.size, args.size), dynamic=False),
                              tile=args.tile, image=(args.size, args.size), with_flops=False,
                              # tile workers need independent tiles; one worker reuses halos
                              halo="recompute" if args.tile_workers > 1 else "reuse")
    say(f"compiled {args.size}x{args.size}: {len(program.tiles)} tiles, "
        f"{time.perf_counter() - started:.1f} s")

    model = StreamingModel(program, device=device)
    run = setup(model, tile_workers=args.tile_workers, timeout=args.timeout)
    ddp = run.wrap(model)  # DistributedDataParallel over the data dimension (if more than 1)
    if run.assignment is not None:
        mine = run.assignment.shares[run.tile_rank]
        print(f"rank {rank}: image group {run.data_rank}, tile worker {run.tile_rank}: "
              f"{mine.tile_count} of {len(program.tiles)} tiles", flush=True)
    say(f"{world} processes: {run.data} image groups x {run.tile_workers} tile workers")
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)

    for step in range(1, args.steps + 1):
        started = time.perf_counter()
        optimizer.zero_grad()
        for micro in range(args.accumulate):
            # The workers of one image group must see the same images: seed by the group.
            rng = np.random.default_rng([step, micro, run.data_rank])
            x, y = make_batch(args.size, args.batch, rng)
            last = micro == args.accumulate - 1
            context = ddp.no_sync() if not last and ddp is not model else nullcontext()
            with context:
                loss = F.cross_entropy(ddp(x.to(device)), y.to(device)) / args.accumulate
                loss.backward()
        optimizer.step()
        say(f"step {step}: loss {loss.item() * args.accumulate:.4f} (image group 0) "
            f"{time.perf_counter() - started:.1f} s", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except StreamcError as exc:  # one line, as the streamc command line does
        print(f"streamc: error: {exc}", file=sys.stderr)
        sys.exit(2)
