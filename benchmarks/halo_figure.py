"""Step time and peak memory against tile size, halo recomputed vs reused, from one results file.

    python -m benchmarks.streaming --sizes 1024 --volumes "" --configs a,d \\
        --tiles 256,512,1024 --min-tile-2d 0 --steps 2 --output benchmarks/results/halo_reuse.json
    python -m benchmarks.streaming --sizes 4096 --volumes "" --configs a,d \\
        --tiles 256,512,1024,2048,4096 --min-tile-2d 0 --steps 1 \\
        --output benchmarks/results/halo_reuse.json
    python -m benchmarks.streaming --sizes 4096 --volumes "" --configs c \\
        --tiles 1024,2048,4096 --min-tile-2d 0 --steps 1 --output benchmarks/results/halo_reuse.json
    python -m benchmarks.halo_figure benchmarks/results/halo_reuse.json --size 4096

(the commands that wrote ``benchmarks/results/halo_reuse.*``; recomputing halos at tile 512
would take about 13× the FLOPs and was not run.)

Reads the records :mod:`benchmarks.streaming` wrote (configurations (a) torch, (c) streamc
recomputing halos, (d) streamc reusing them) and draws, at one image size, the median step time
and the peak resident memory of (c) and (d) against the tile, with torch's as a horizontal line.
Writes ``<results stem>_<size>.png`` beside the results file (needs matplotlib).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

GIB = 1024 ** 3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("--size", type=int, default=4096)
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in json.loads(args.results.read_text())["runs"]
            if r["kind"] == "2d" and r["size"] == args.size and r.get("status") == "ok"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    names = {"c": "streamc, halo recomputed", "d": "streamc, halo reused"}
    for config, name in names.items():
        pts = sorted((r for r in runs if r["config"] == config and r.get("tile") != "plan"),
                     key=lambda r: int(r["tile"]))
        if not pts:
            continue
        tiles = [int(r["tile"]) for r in pts]
        axes[0].plot(tiles, [r["median_s"] for r in pts], marker="o", label=name)
        axes[1].plot(tiles, [r["peak_bytes"] / GIB for r in pts], marker="o", label=name)
    torch_run = next((r for r in runs if r["config"] == "a"), None)
    if torch_run is not None:
        axes[0].axhline(torch_run["median_s"], color="grey", ls="--", label="torch")
        axes[1].axhline(torch_run["peak_bytes"] / GIB, color="grey", ls="--", label="torch")
    for ax, ylabel in zip(axes, ("training step, s", "peak resident memory, GiB")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tile, px")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"ResNet-18 at {args.size}², 2 CPU cores: step and peak against tile size")
    fig.tight_layout()
    out = args.results.with_name(f"{args.results.stem}_{args.size}.png")
    fig.savefig(out, dpi=110)
    print(f"written {out}")


if __name__ == "__main__":
    main()
