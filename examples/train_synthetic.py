"""Train a CNN end to end on multi-megapixel images with streamc, on the CPU.

The task needs full resolution. Each image is noise with a few small square patches at random
places; in class 1 the patches carry a one-pixel checkerboard, in class 0 they are flat with the
same mean. Any 2x downsampling averages the checkerboard into the flat patch, so the classes
become identical: a model has to see the full-resolution image, which is what streamc makes
affordable (the network runs tile by tile, forward and backward, with exact gradients).

Steps: define a torch CNN (frozen BatchNorm, global max pool head), estimate its BatchNorm
statistics on crops and freeze them, export it to ONNX, compile it for the image size, wrap the
program in :class:`~streamc.runtime.module.StreamingModel` and train it with torch's Adam,
printing loss and accuracy. The default (1024x1024, tile 512, 12 steps of 4 images) takes a few
minutes on two cores; pass ``--size 4096 --steps 40`` and so on for bigger runs::

    python examples/train_synthetic.py
    python examples/train_synthetic.py --size 2048 --tile 512 --steps 20 --batch 2
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from streamc.compiler import compile as compile_program  # noqa: E402
from streamc.export import export_torch  # noqa: E402
from streamc.runtime.module import StreamingModel  # noqa: E402


class CheckerNet(nn.Module):
    """Four 3x3 convs (stride 1, 2, 2, 2) with one frozen BatchNorm, then a global max pool.

    The convolutions are the local prefix streamc tiles; the global max pool and the linear
    layer are the head, run once on the (stride-8) feature map.
    """

    def __init__(self, channels: int = 1, width: int = 8, classes: int = 2) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1)
        self.conv4 = nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1)
        self.fc = nn.Linear(4 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.conv2(x))
        x = F.relu(self.conv3(x))
        x = F.relu(self.conv4(x))
        # A global max pool. (nn.AdaptiveMaxPool2d(1) would export as a MaxPool whose kernel is
        # the whole feature map, which streamc would take for a local op and not tile.)
        return self.fc(x.amax(dim=(2, 3)))


def make_image(size: int, label: int, rng: np.random.Generator, patches: int = 6,
               patch: int = 8, noise: float = 0.5) -> np.ndarray:
    """(1, size, size) float32: noise plus ``patches`` squares, checkered iff ``label``."""
    image = rng.normal(0.0, noise, (1, size, size)).astype(np.float32)
    yy, xx = np.mgrid[:patch, :patch]
    checker = np.where((yy + xx) % 2 == 0, 1.0, -1.0).astype(np.float32)
    for _ in range(patches):
        top, left = rng.integers(0, size - patch, size=2)
        mean = 1.0
        block = mean + checker * 1.5 if label else np.full((patch, patch), mean, np.float32)
        image[0, top:top + patch, left:left + patch] = block
    return image


def make_batch(size: int, batch: int, rng: np.random.Generator) -> tuple[torch.Tensor,
                                                                          torch.Tensor]:
    labels = np.arange(batch) % 2
    rng.shuffle(labels)
    images = np.stack([make_image(size, int(y), rng) for y in labels])
    return torch.from_numpy(images), torch.from_numpy(labels).long()


def calibrate_batchnorm(model: nn.Module, rng: np.random.Generator, crops: int = 8,
                        crop: int = 256) -> None:
    """Estimate BatchNorm statistics on small crops (the images are stationary), then freeze."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average
    with torch.no_grad():
        for k in range(crops):
            model(torch.from_numpy(make_image(crop, k % 2, rng, patches=2)[None]))
    model.eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="streamc: train on large synthetic images")
    parser.add_argument("--size", type=int, default=1024, help="image side (pixels)")
    parser.add_argument("--tile", type=int, default=512, help="largest tile side (pixels)")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=4, help="images per step")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--eval-images", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (needs onnxruntime-gpu)")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    net = CheckerNet()
    calibrate_batchnorm(net, rng)

    start = time.perf_counter()
    # Exported at the training size (static shapes): BatchNorm stays a BatchNormalization node
    # and the ONNX initializers keep the torch state_dict names.
    model = export_torch(net, (1, 1, args.size, args.size), dynamic=False)
    program = compile_program(model, tile=args.tile, image=(args.size, args.size),
                              with_flops=False)
    mpx = args.size * args.size / 1e6
    print(f"compiled for {args.size}x{args.size} ({mpx:.1f} Mpx): {len(program.tiles)} tiles of "
          f"at most {args.tile}px, {len(program.classes)} shape classes, "
          f"{time.perf_counter() - start:.1f} s")

    model = StreamingModel(program, device=args.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    eval_rng = np.random.default_rng(args.seed + 1)
    eval_x, eval_y = make_batch(args.size, args.eval_images, eval_rng)
    device = model.device

    def evaluate() -> float:
        with torch.no_grad():
            logits = model(eval_x.to(device))
        return (logits.argmax(1).cpu() == eval_y).float().mean().item()

    print(f"step  0: held-out accuracy {evaluate():.2f}")
    for step in range(1, args.steps + 1):
        started = time.perf_counter()
        x, y = make_batch(args.size, args.batch, rng)
        logits = model(x.to(device))
        loss = F.cross_entropy(logits, y.to(device))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        accuracy = (logits.argmax(1).cpu() == y).float().mean().item()
        print(f"step {step:2d}: loss {loss.item():.4f}  batch accuracy {accuracy:.2f}  "
              f"({time.perf_counter() - started:.1f} s)", flush=True)
    print(f"held-out accuracy after {args.steps} steps: {evaluate():.2f}")


if __name__ == "__main__":
    main()
