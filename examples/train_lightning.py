"""Train with streamc under PyTorch Lightning's DDP strategy (for users coming from lightstream).

Lightning is optional (``pip install lightning``); without it this script says so and exits.

    python examples/train_lightning.py                          # 2 CPU processes, DDP
    python examples/train_lightning.py --tile-workers 2         # both processes share each image
    python examples/train_lightning.py --devices 4 --tile-workers 2   # 2 images x 2 workers

A :class:`~streamc.runtime.module.StreamingModel` is an ordinary submodule of the
LightningModule: its parameters get their gradients through autograd, so Lightning's DDP
averages them as it does any module's (no manual all-reduce, no bypassed hooks, and
``accumulate_grad_batches`` skips the synchronisation of all but the last micro-batch).

Tile-parallel: :meth:`StreamcTask.setup` (run by Lightning once the process group exists, before
it wraps the module in DDP) calls :func:`streamc.runtime.distributed.setup`, which splits each
image's tiles among ``--tile-workers`` processes; the data loader then gives the workers of one
image group the same images (Lightning's own distributed sampler is turned off). Every worker
of an image group ends the backward pass with the same whole-image gradient, so DDP's average
over all processes equals the average over image groups (the gradients of an image group travel
twice: once within the group, once in DDP's all-reduce).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_synthetic import CheckerNet, calibrate_batchnorm, make_image  # noqa: E402

from streamc.compiler import compile as compile_program  # noqa: E402
from streamc.export import export_torch  # noqa: E402
from streamc.runtime.module import StreamingModel  # noqa: E402


class SyntheticImages(Dataset):
    """Image ``k`` is noise with checkered (label 1) or flat (label 0) patches, seeded by k."""

    def __init__(self, size: int, count: int) -> None:
        self.size, self.count = size, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, k: int) -> tuple[torch.Tensor, int]:
        label = k % 2
        return torch.from_numpy(make_image(self.size, label, np.random.default_rng(k))), label


def build_task(lightning, args: argparse.Namespace):
    class StreamcTask(lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)  # the same network in every process
            net = CheckerNet()
            calibrate_batchnorm(net, np.random.default_rng(0))
            program = compile_program(export_torch(net, (1, 1, args.size, args.size),
                                                   dynamic=False),
                                      tile=args.tile, image=(args.size, args.size),
                                      with_flops=False,
                                      halo="recompute" if args.tile_workers > 1 else "reuse")
            self.model = StreamingModel(program, threads=args.threads)
            self.data_rank, self.data_groups = 0, 1

        def setup(self, stage: str) -> None:
            # Checks every process compiled the same program; with tile workers, gives this
            # one its tiles. Image groups (data_rank) decide which images a process gets.
            from streamc.runtime.distributed import setup

            run = setup(self.model, tile_workers=args.tile_workers, timeout=300)
            self.data_rank, self.data_groups = run.data_rank, run.data

        def train_dataloader(self) -> DataLoader:
            data = SyntheticImages(args.size, args.images)
            sampler = DistributedSampler(data, num_replicas=self.data_groups,
                                         rank=self.data_rank, shuffle=True, seed=0)
            return DataLoader(data, batch_size=args.batch, sampler=sampler)

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = F.cross_entropy(self.model(x), y)
            self.log("loss", loss, prog_bar=True)
            return loss

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=args.lr)

    return StreamcTask()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="streamc under PyTorch Lightning")
    parser.add_argument("--size", type=int, default=512, help="image side (pixels)")
    parser.add_argument("--tile", type=int, default=256, help="largest tile side (pixels)")
    parser.add_argument("--devices", type=int, default=2, help="processes")
    parser.add_argument("--tile-workers", type=int, default=1, help="processes per image")
    parser.add_argument("--images", type=int, default=8, help="training images per epoch")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--accumulate", type=int, default=2, help="micro-batches per step")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads each")
    parser.add_argument("--lr", type=float, default=1e-2)
    args = parser.parse_args(argv)
    try:
        import lightning
    except ImportError:
        print("this example needs PyTorch Lightning (pip install lightning); skipped.")
        return
    trainer = lightning.Trainer(
        accelerator="cpu", devices=args.devices, strategy="ddp", max_epochs=args.epochs,
        accumulate_grad_batches=args.accumulate, use_distributed_sampler=False,
        logger=False, enable_checkpointing=False, enable_model_summary=False)
    trainer.fit(build_task(lightning, args))


if __name__ == "__main__":
    main()
