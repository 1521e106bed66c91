"""Train from whole-slide images on disk: pyramidal TIFFs of mixed sizes, read tile by tile.

The task of ``train_synthetic.py`` as slides: each slide is tinted noise with a few small
square patches, checkered (one-pixel checkerboard) in class 1 and flat in class 0; at level 1
(2x downsampled) the checkerboard averages away, so the model must read level 0. Steps:

1. write a few synthetic pyramidal TIFFs of different sizes with tifffile (no downloads) and a
   CSV of (path, label, level) rows, for training and for held-out evaluation;
2. a torch CNN (frozen BatchNorm, global max pool head), BatchNorm statistics estimated on
   crops read from the slides, exported to ONNX with dynamic spatial axes;
3. :class:`~streamc.runtime.any_size.AnySizeModel`: one module for every slide size, compiling
   one program per size on first sight into a cache directory (the second epoch compiles
   nothing), fed by a plain ``DataLoader`` over :class:`~streamc.data.dataset.SlideDataset`
   with worker processes; each tile's crop is read from the TIFF when the tile runs;
4. held-out accuracy in ``eval()`` (forward-only programs), and a saliency map of one held-out
   slide written tile by tile to a tiled TIFF (:func:`streamc.predict.saliency`).

The defaults take a few minutes on two cores::

    python examples/train_slides.py
    python examples/train_slides.py --size 4096 --slides 8 --epochs 4 --tile 1024
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

from train_synthetic import CheckerNet  # noqa: E402

from streamc.data import SlideDataset, Transform, collate_slides, open_slide  # noqa: E402
from streamc.export import export_torch  # noqa: E402
from streamc.predict import saliency  # noqa: E402
from streamc.runtime.any_size import AnySizeModel  # noqa: E402
from zoo.slides import SyntheticSlide, write_pyramid  # noqa: E402

#: Background mean and noise of the synthetic slides, as the model's normalisation.
TRANSFORM = Transform(mean=(0.80, 0.59, 0.75), std=(0.1, 0.1, 0.1))


def write_slides(folder: Path, count: int, size: int, seed: int, name: str) -> Path:
    """``count`` slides of sizes around ``size`` (alternating labels) and their CSV."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for k in range(count):
        height, width = (int(size * f) // 32 * 32 for f in rng.uniform(0.75, 1.25, 2))
        slide = SyntheticSlide(height, width, label=k % 2, seed=seed * 1000 + k)
        path = write_pyramid(folder / f"{name}{k}.tif", slide, levels=2, compression="zlib")
        rows.append((path.name, slide.label, 0))
    table = folder / f"{name}.csv"
    with open(table, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "level"])
        writer.writerows(rows)
    return table


def calibrate_batchnorm(net: CheckerNet, dataset: SlideDataset, crop: int = 256) -> None:
    """BatchNorm statistics from crops of the training slides (they are stationary), frozen."""
    net.train()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # a cumulative average
    with torch.no_grad():
        for k in range(len(dataset)):
            source = dataset.source(k)
            index = (slice(0, 1), slice(None), slice(0, crop), slice(0, crop))
            net(torch.from_numpy(source.read(index)))
    net.eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="streamc: train from slides on disk")
    parser.add_argument("--folder", type=Path, default=Path("streamc-slides"))
    parser.add_argument("--size", type=int, default=1024, help="typical slide side (pixels)")
    parser.add_argument("--slides", type=int, default=8, help="training slides")
    parser.add_argument("--held-out", type=int, default=4)
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)

    started = time.perf_counter()
    train_csv = write_slides(args.folder, args.slides, args.size, args.seed + 1, "train")
    test_csv = write_slides(args.folder, args.held_out, args.size, args.seed + 2, "test")
    print(f"wrote {args.slides} + {args.held_out} pyramidal TIFFs of about {args.size}² px to "
          f"{args.folder} ({time.perf_counter() - started:.1f} s)")

    train = SlideDataset.from_csv(train_csv, transform=TRANSFORM)
    test = SlideDataset.from_csv(test_csv, transform=TRANSFORM)
    net = CheckerNet(channels=3)
    calibrate_batchnorm(net, train)
    onnx_path = args.folder / "checkernet.onnx"
    export_torch(net, (1, 3, 256, 256), onnx_path)  # dynamic spatial axes: any slide size

    model = AnySizeModel(onnx_path, args.tile, args.folder / "programs")
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    loader = DataLoader(train, batch_size=1, shuffle=True, num_workers=args.workers,
                        collate_fn=collate_slides)

    def evaluate() -> float:
        model.eval()
        right = 0
        with torch.no_grad():
            for k in range(len(test)):
                source, label = test[k]
                right += int(model(source).argmax(1).item() == label)
        model.train()
        return right / len(test)

    for epoch in range(1, args.epochs + 1):
        compiled = model.cache.stats.compiled
        t0 = time.perf_counter()
        losses = []
        for images, labels in loader:
            loss = F.cross_entropy(model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        print(f"epoch {epoch}: mean loss {np.mean(losses):.4f}, "
              f"{model.cache.stats.compiled - compiled} programs compiled, "
              f"{time.perf_counter() - t0:.1f} s", flush=True)
    print(f"programs: {model.programs}")
    print(f"held-out accuracy: {evaluate():.2f}")

    trained = model.export_onnx(args.folder / "trained.onnx")
    source = open_slide(test.rows[1].path if Path(test.rows[1].path).is_absolute()
                        else args.folder / test.rows[1].path, level=0, transform=TRANSFORM)
    result = saliency(trained, source, args.folder / "saliency.tif", tile=args.tile, force=True)
    print(f"saliency of {source.path.name} ({result.objective}) written to "
          f"{result.written.path} and {result.written.preview} in {result.seconds:.1f} s")


if __name__ == "__main__":
    main()
