"""Whole-slide data (issue 16): training from a pyramidal TIFF on disk vs the same image in
memory, a dataset of mixed sizes through one model, and ``streamc predict`` at slide scale.

    python -m benchmarks.slides --parts step --size 8192             # disk vs memory, 8192²
    python -m benchmarks.slides --parts step --size 16384 --level 0
    python -m benchmarks.slides --parts crop,dataset,plan
    python -m benchmarks.slides --parts predict --predict-sizes 8192,16384

The slide: :class:`zoo.slides.SyntheticSlide` written by :func:`zoo.slides.write_pyramid` as a
pyramidal tiled TIFF (``--slide`` px at level 0, 3 levels, 256² JPEG tiles as in SVS files) in
``--work``; written once and reused.

Parts, each configuration in its own child process (its peak resident memory is its own:
``VmHWM`` after resetting it before the measured work, and the child's ``ru_maxrss``):

- ``step``: one ResNet-18 training step (width 64, BatchNorm frozen with random statistics,
  2 classes; forward, cross-entropy, backward) through :class:`~streamc.StreamingModel` at
  level ``--level`` of the slide (``--size`` px), tile ``--tile``, (disk) with the slide's level
  as a lazy source (each tile's crop read and normalised on demand, a crop ahead on a thread),
  and (memory) with the same level read whole into a float32 tensor first (not timed). Both
  run one cold step (same session builds). The I/O overhead is disk / memory − 1; the weight
  gradients of the two must be equal bit for bit.
- ``crop``: the same network on a ``--crop`` px region of level 0 read lazily from the slide
  (tile ``--crop-tile``), against torch autograd on that region in memory: the largest relative
  difference of the weight gradients (max |g − g_torch| / max |g_torch| per parameter).
- ``dataset``: ``--slides`` synthetic slides of different sizes (about ``--dataset-size``) as
  TIFFs and a CSV, two epochs of training through one
  :class:`~streamc.runtime.any_size.AnySizeModel` (examples/train_slides.py's CheckerNet) fed by
  a ``DataLoader`` with 2 workers: programs compiled per epoch (the second must be 0).
- ``predict``: ``streamc predict`` of a fully local two-class segmentation network
  (:class:`zoo.models.UNetish` + softmax, ``--predict-width``) at each of ``--predict-sizes``
  (levels of the slide) into a tiled TIFF: time, peak memory (bounded: about the same at every
  size) and the largest difference from an untiled torch run on a ``--check`` px crop.
- ``compile``: ResNet-18 at ``--compile-size`` compiled for training and for inference
  (``streamc compile --inference``): seconds and bytes on disk.
- ``plan``: the memory plan of the ResNet-18 step at ``--plan-size`` (compile only): what a
  step at a size too slow to run here would need, without the image (which a lazy source never
  holds).

Results merge into ``benchmarks/results/slides.json`` (keyed by part and size).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.proc_status import reset_peak, status_kb

RESULTS = Path(__file__).parent / "results" / "slides.json"
GIB = 1024 ** 3
#: Normalisation of the synthetic slides (background mean, noise), as the models see them.
MEAN, STD = (0.80, 0.59, 0.75), (0.1, 0.1, 0.1)


# -- child side -------------------------------------------------------------------------------

def _resnet(width: int = 64):
    import torch

    from zoo import randomize_batchnorm, resnet18

    torch.manual_seed(0)
    return randomize_batchnorm(resnet18(classes=2, width=width), seed=1,
                               weight="uniform").eval()


def _export(module, path: Path) -> Path:
    from streamc.export import export_torch

    if not path.exists():
        export_torch(module, (1, 3, 224, 224), path)
    return path


class TimedSource:
    """A source that adds up the seconds spent reading (on whichever thread reads)."""

    def __init__(self, source) -> None:
        self.source = source
        self.seconds = 0.0
        self.reads = 0

    @property
    def shape(self):
        return self.source.shape

    def read(self, index):
        started = time.perf_counter()
        try:
            return self.source.read(index)
        finally:
            self.seconds += time.perf_counter() - started
            self.reads += 1


def child_step(spec: dict) -> dict:
    import numpy as np
    import torch

    from streamc.compiler import compile as compile_program
    from streamc.data import Transform, open_slide
    from streamc.runtime.module import StreamingModel

    torch.set_num_threads(2)
    width = spec.get("width", 64)
    out: dict = {"width": width}
    module = _resnet(width)
    model_path = _export(module, Path(spec["work"]) / f"resnet18_w{width}.onnx")
    source = open_slide(spec["slide"], level=spec["level"], transform=Transform(mean=MEAN,
                                                                               std=STD))
    size = tuple(source.shape[2:])
    started = time.perf_counter()
    program = compile_program(str(model_path), spec["tile"], image=size, with_flops=True)
    out.update(compile_s=round(time.perf_counter() - started, 2), image=list(size),
               tiles=len(program.tiles), classes=len(program.classes),
               forward_overhead=program.meta.flops.forward_overhead,
               image_float32_bytes=int(np.prod(source.shape)) * 4)
    model = StreamingModel(program, threads=2, progress=False)
    model.load_state_dict(module.state_dict(), strict=False)
    del module
    if spec["config"] == "memory":
        started = time.perf_counter()
        image = torch.from_numpy(source.read((slice(None),) * 4))
        out["read_whole_s"] = round(time.perf_counter() - started, 2)
    else:
        image = TimedSource(source)
    label = torch.tensor([1])
    reset_peak()
    start, start_cpu = time.perf_counter(), time.process_time()
    loss = torch.nn.functional.cross_entropy(model(image), label)
    loss.backward()
    out["step_s"] = round(time.perf_counter() - start, 2)
    out["step_cpu_s"] = round(time.process_time() - start_cpu, 2)
    out["peak_rss_bytes"] = status_kb("VmHWM") * 1024
    out["loss"] = float(loss.item())
    out["loadavg"] = round(os.getloadavg()[0], 2)
    if isinstance(image, TimedSource):
        out["read_s"] = round(image.seconds, 2)  # on the prefetch thread, overlapping compute
        out["crops_read"] = image.reads
    np.savez(spec["grads"], **{k: p.grad.numpy() for k, p in model.onnx_parameters.items()})
    return out


def child_crop(spec: dict) -> dict:
    import numpy as np
    import torch

    from streamc.compiler import compile as compile_program
    from streamc.data import Transform, open_slide, region
    from streamc.runtime.module import StreamingModel

    torch.set_num_threads(2)
    module = _resnet()
    model_path = _export(module, Path(spec["work"]) / "resnet18.onnx")
    crop, y0, x0 = spec["crop"], spec["origin"], spec["origin"]
    source = region(open_slide(spec["slide"], level=0, transform=Transform(mean=MEAN, std=STD)),
                    slice(y0, y0 + crop), slice(x0, x0 + crop))
    program = compile_program(str(model_path), spec["crop_tile"], image=(crop, crop),
                              with_flops=False)
    model = StreamingModel(program, threads=2, progress=False)
    model.load_state_dict(module.state_dict(), strict=False)
    label = torch.tensor([1])
    torch.nn.functional.cross_entropy(model(source), label).backward()
    x = torch.from_numpy(source.read((slice(None),) * 4))
    torch.nn.functional.cross_entropy(module(x), label).backward()
    reference = dict(module.named_parameters())
    # torch in float64: how far float32 itself (torch's or streamc's) is from the exact value
    exact_module = _resnet().double()
    torch.nn.functional.cross_entropy(exact_module(x.double()), label).backward()
    exact = dict(exact_module.named_parameters())

    def worst(grads) -> tuple[float, str]:
        diffs = {key: ((grads[key].double() - want.grad).abs().max()
                       / want.grad.abs().max()).item() for key, want in exact.items()}
        name = max(diffs, key=diffs.get)
        return diffs[name], name

    streamed = {k: p.grad for k, p in model.onnx_parameters.items()}
    vs_torch = max(((streamed[k] - reference[k].grad).abs().max()
                    / reference[k].grad.abs().max()).item() for k in streamed)
    streamc_error, streamc_worst = worst(streamed)
    torch_error, torch_worst = worst({k: p.grad for k, p in reference.items()})
    return {"crop": crop, "origin": [y0, x0], "tile": spec["crop_tile"],
            "tiles": len(program.tiles), "max_rel_grad_diff_vs_torch_float32": vs_torch,
            "max_rel_grad_error_streamc_vs_float64": streamc_error,
            "worst_parameter_streamc": streamc_worst,
            "max_rel_grad_error_torch_float32_vs_float64": torch_error,
            "worst_parameter_torch": torch_worst,
            "parameters": len(reference), "image_pixels_read": int(np.prod(x.shape[2:]))}


def child_dataset(spec: dict) -> dict:
    import csv

    import numpy as np
    import torch
    from torch.nn import functional as F
    from torch.utils.data import DataLoader

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    from train_synthetic import CheckerNet

    from streamc.data import SlideDataset, Transform, collate_slides
    from streamc.export import export_torch
    from streamc.runtime.any_size import AnySizeModel
    from zoo.slides import SyntheticSlide, write_pyramid

    torch.set_num_threads(2)
    folder = Path(spec["work"]) / "dataset"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    base = spec["dataset_size"]
    sizes = []
    with open(folder / "slides.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "level"])
        for k in range(spec["slides"]):
            h, w = (int(base * s) // 16 * 16 for s in rng.uniform(0.7, 1.3, 2))
            path = folder / f"slide{k}.tif"
            if not path.exists():
                write_pyramid(path, SyntheticSlide(h, w, label=k % 2, seed=k), levels=2,
                              compression="zlib")
            writer.writerow([path.name, k % 2, 0])
            sizes.append([h, w])
    dataset = SlideDataset.from_csv(folder / "slides.csv",
                                    transform=Transform(mean=MEAN, std=STD))
    torch.manual_seed(0)
    model_path = folder / "checkernet.onnx"
    export_torch(CheckerNet(channels=3), (1, 3, 256, 256), model_path)
    cache = Path(tempfile.mkdtemp(prefix="streamc-cache-", dir=spec["work"]))
    model = AnySizeModel(model_path, spec["dataset_tile"], cache)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    loader = DataLoader(dataset, batch_size=1, shuffle=True, num_workers=2,
                        collate_fn=collate_slides)
    epochs = []
    for _ in range(2):
        compiled, loaded = model.cache.stats.compiled, model.cache.stats.loaded
        started = time.perf_counter()
        losses = []
        for images, labels in loader:
            loss = F.cross_entropy(model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        epochs.append({"compiled": model.cache.stats.compiled - compiled,
                       "loaded": model.cache.stats.loaded - loaded,
                       "seconds": round(time.perf_counter() - started, 1),
                       "mean_loss": round(float(np.mean(losses)), 4)})
    # a fresh model on the same cache directory: a new process compiles nothing
    again = AnySizeModel(model_path, spec["dataset_tile"], cache)
    for images, labels in DataLoader(dataset, batch_size=1, collate_fn=collate_slides):
        F.cross_entropy(again(images), labels).backward()
    return {"slides": len(sizes), "sizes": sizes, "tile": spec["dataset_tile"],
            "epochs": epochs, "cache": model.cache.stats.to_dict(),
            "summary": model.programs, "fresh_model_on_same_cache": again.cache.stats.to_dict()}


def _segnet(width: int):
    import torch

    from zoo.models import UNetish

    class SegNet(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.unet = UNetish(width)

        def forward(self, x):
            return torch.softmax(self.unet(x), dim=1)

    torch.manual_seed(0)
    return SegNet().eval()


def child_predict(spec: dict) -> dict:
    import numpy as np
    import tifffile
    import torch

    from streamc.compiler import compile as compile_program
    from streamc.data import Transform, open_slide
    from streamc.export import export_torch
    from streamc.predict import predict

    torch.set_num_threads(2)
    net = _segnet(spec["predict_width"])
    model = export_torch(net, (1, 3, 256, 256))
    source = open_slide(spec["slide"], level=spec["level"],
                        transform=Transform(mean=MEAN, std=STD))
    size = tuple(source.shape[2:])
    program = compile_program(model, spec["tile"], image=size, with_flops=False,
                              mode="inference")
    out_path = Path(spec["work"]) / f"heatmap_{size[0]}.tif"
    reset_peak()
    result = predict(program, source, out_path, force=True, threads=2, progress=False)
    out = {"image": list(size), "tile": spec["tile"], "tiles": result.tiles,
           "seconds": round(result.seconds, 1), "peak_rss_bytes": status_kb("VmHWM") * 1024,
           "map_bytes": int(np.prod(result.written.shape)) * 4,
           "image_float32_bytes": int(np.prod(source.shape)) * 4,
           "output": str(out_path), "tiff_bytes": out_path.stat().st_size}
    # an untiled torch run on a crop: the centre of its output is the map's (the margin covers
    # the receptive field; the crop starts at multiples of 4, the network's pooling lattice)
    check, margin = spec["check"], 32
    y0 = x0 = (size[0] // 2) // 4 * 4
    window = source.read((slice(0, 1), slice(None), slice(y0, y0 + check),
                          slice(x0, x0 + check)))
    with torch.no_grad():
        expected = net(torch.from_numpy(window))[0].numpy().transpose(1, 2, 0)
    with tifffile.TiffFile(out_path) as tf:
        import zarr

        written = zarr.open(tf.aszarr(), mode="r")[y0 + margin:y0 + check - margin,
                                                    x0 + margin:x0 + check - margin]
        out["tiff_tiled"] = bool(tf.pages[0].is_tiled)
    diff = np.abs(np.asarray(written) - expected[margin:-margin, margin:-margin]).max()
    out.update(check_crop=[y0, x0, check], check_max_abs_diff=float(diff))
    return out


def child_plan(spec: dict) -> dict:
    from streamc.compiler import compile as compile_program

    module = _resnet()
    model_path = _export(module, Path(spec["work"]) / "resnet18.onnx")
    size = spec["plan_size"]
    started = time.perf_counter()
    program = compile_program(str(model_path), spec["tile"], image=(size, size),
                              with_flops=False)
    plan = program.memory_plan
    image = plan["resident"]["image"]
    return {"image": [size, size], "tile": spec["tile"], "tiles": len(program.tiles),
            "compile_and_plan_s": round(time.perf_counter() - started, 1),
            "policy": plan.get("policy"), "planned_peak_bytes": plan["peak"],
            "planned_image_bytes": image, "planned_peak_without_image_bytes": plan["peak"] - image,
            "resident": plan["resident"], "peak_phase": plan["peak_phase"]}


def child_compile(spec: dict) -> dict:
    """Training vs inference program of ResNet-18 at ``--compile-size``: compile time (the same
    passes but the memory plan, which inference programs do not have, and the FLOPs) and size
    on disk."""
    module = _resnet()
    model_path = _export(module, Path(spec["work"]) / "resnet18.onnx")
    size = spec["compile_size"]
    out = {"image": [size, size], "tile": spec["tile"]}
    from streamc.compiler import compile as compile_program

    for mode in ("train", "inference"):
        started = time.perf_counter()
        program = compile_program(str(model_path), spec["tile"], image=(size, size),
                                  with_flops=False, with_memory_plan=False, mode=mode)
        seconds = time.perf_counter() - started
        target = Path(spec["work"]) / f"resnet18_{size}_{mode}.streamc"
        program.save(target, force=True)
        out[mode] = {"compile_s": round(seconds, 2), "graphs": len(program.graphs),
                     "bytes_on_disk": sum(f.stat().st_size for f in target.rglob("*")
                                          if f.is_file())}
    return out


CHILDREN = {"step": child_step, "compile": child_compile, "crop": child_crop,
            "dataset": child_dataset, "predict": child_predict, "plan": child_plan}


def child_main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    try:
        out = CHILDREN[spec["part"]](spec)
        out["status"] = "ok"
    except Exception as exc:  # recorded; the parent goes on
        import traceback

        traceback.print_exc()
        out = {"status": "failed", "note": f"{type(exc).__name__}: {exc}"[:400]}
    out["child_max_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    Path(spec["result"]).write_text(json.dumps(out))


# -- parent side ------------------------------------------------------------------------------

def launch(spec: dict, log) -> dict:
    with tempfile.TemporaryDirectory(prefix="streamc-slides-") as tmp:
        spec = dict(spec, result=str(Path(tmp) / "result.json"))
        path = Path(tmp) / "spec.json"
        path.write_text(json.dumps(spec))
        env = dict(os.environ, OMP_NUM_THREADS="2",
                   PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1])]
                                              + [p for p in [os.environ.get("PYTHONPATH")]
                                                 if p]))
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "benchmarks.slides", "--child", str(path)],
                              env=env, capture_output=True, text=True)
        record = (json.loads(Path(spec["result"]).read_text())
                  if Path(spec["result"]).exists()
                  else {"status": "failed", "note": f"exit {proc.returncode}"})
        if record.get("status") != "ok":
            log(proc.stdout[-3000:] + proc.stderr[-3000:])
        record["wall_s"] = round(time.perf_counter() - started, 1)
        return record


def ensure_slide(work: Path, size: int, log) -> Path:
    from zoo.slides import SyntheticSlide, write_pyramid

    path = work / f"slide_{size}.tif"
    if not path.exists():
        started = time.perf_counter()
        partial = work / f".slide_{size}.partial.tif"
        write_pyramid(partial, SyntheticSlide(size, size, label=1, seed=7, patches=64),
                      levels=3, compression="jpeg", quality=90)
        partial.replace(path)
        log(f"wrote {path} ({path.stat().st_size / GIB:.2f} GiB) in "
            f"{time.perf_counter() - started:.0f} s")
    return path


def grads_equal(a: Path, b: Path) -> dict:
    import numpy as np

    ga, gb = np.load(a), np.load(b)
    worst = max(float(np.abs(ga[k] - gb[k]).max()) for k in ga.files)
    return {"parameters": len(ga.files), "identical": worst == 0.0, "max_abs_diff": worst}


def save(results: Path, section: str, key: str, record: dict) -> None:
    data = json.loads(results.read_text()) if results.exists() else {}
    data.setdefault("machine", {"cpus": os.cpu_count(), "platform": platform.platform(),
                                "python": platform.python_version()})
    data.setdefault(section, {})[key] = record
    results.parent.mkdir(parents=True, exist_ok=True)
    tmp = results.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(results)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        child_main(sys.argv[2])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="step,crop,dataset,predict,plan")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "streamc-slides")
    parser.add_argument("--slide", type=int, default=16384, help="level-0 side of the slide")
    parser.add_argument("--level", type=int, default=1, help="slide level of the step")
    parser.add_argument("--tile", type=int, default=2048)
    parser.add_argument("--crop", type=int, default=1024)
    parser.add_argument("--crop-tile", type=int, default=640)
    parser.add_argument("--slides", type=int, default=6)
    parser.add_argument("--dataset-size", type=int, default=1024)
    parser.add_argument("--dataset-tile", type=int, default=512)
    parser.add_argument("--predict-sizes", default="8192,16384")
    parser.add_argument("--predict-width", type=int, default=8)
    parser.add_argument("--check", type=int, default=512)
    parser.add_argument("--plan-size", type=int, default=32768)
    parser.add_argument("--compile-size", type=int, default=8192)
    parser.add_argument("--configs", default="disk,memory",
                        help="step configurations (memory: the level read whole first)")
    parser.add_argument("--width", type=int, default=64, help="ResNet-18 width of the step")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run the step configurations this many times, interleaved")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)

    def log(text: str) -> None:
        print(text, flush=True)

    slide = ensure_slide(args.work, args.slide, log)
    base = {"work": str(args.work), "slide": str(slide), "tile": args.tile}
    parts = args.parts.split(",")
    if "step" in parts:
        size = args.slide >> args.level
        runs: dict[str, list] = {}
        for _ in range(args.repeat):
            for config in args.configs.split(","):
                grads = args.work / f"grads_{size}_{config}.npz"
                run = launch(dict(base, part="step", config=config, level=args.level,
                                  grads=str(grads), width=args.width), log)
                runs.setdefault(config, []).append(run)
                log(f"step {size}² {config}: {json.dumps(run)}")
        record = {"slide": args.slide, "level": args.level, "width": args.width,
                  **{k: v[0] if len(v) == 1 else v for k, v in runs.items()}}
        ok = {k: [r for r in v if r.get("status") == "ok"] for k, v in runs.items()}
        if len(ok) == 2 and all(ok.values()):
            for measure in ("step_s", "step_cpu_s"):  # the median over the repeats
                disk = sorted(r[measure] for r in ok["disk"])[len(ok["disk"]) // 2]
                memory = sorted(r[measure] for r in ok["memory"])[len(ok["memory"]) // 2]
                record[f"io_overhead_{measure[:-2]}"] = round(disk / memory - 1, 4)
            record["gradients"] = grads_equal(args.work / f"grads_{size}_disk.npz",
                                              args.work / f"grads_{size}_memory.npz")
        key = str(size) if args.width == 64 else f"{size} width {args.width}"
        save(args.output, "step", key, record)
        log(f"step {size}²: {json.dumps({k: v for k, v in record.items() if k != 'disk'})}")
    if "crop" in parts:
        record = launch(dict(base, part="crop", crop=args.crop, crop_tile=args.crop_tile,
                             origin=(args.slide // 2) // 32 * 32), log)
        record["slide"] = args.slide
        save(args.output, "crop", f"{args.crop} of {args.slide}", record)
        log(f"crop: {json.dumps(record)}")
    if "dataset" in parts:
        record = launch(dict(base, part="dataset", slides=args.slides,
                             dataset_size=args.dataset_size, dataset_tile=args.dataset_tile),
                        log)
        save(args.output, "dataset", str(args.slides), record)
        log(f"dataset: {json.dumps(record)}")
    if "predict" in parts:
        for size in map(int, args.predict_sizes.split(",")):
            level = (args.slide // size).bit_length() - 1
            record = launch(dict(base, part="predict", level=level, check=args.check,
                                 predict_width=args.predict_width), log)
            save(args.output, "predict", str(size), record)
            log(f"predict {size}²: {json.dumps(record)}")
    if "compile" in parts:
        record = launch(dict(base, part="compile", compile_size=args.compile_size), log)
        save(args.output, "compile", str(args.compile_size), record)
        log(f"compile: {json.dumps(record)}")
    if "plan" in parts:
        record = launch(dict(base, part="plan", plan_size=args.plan_size), log)
        save(args.output, "plan", str(args.plan_size), record)
        log(f"plan: {json.dumps(record)}")


if __name__ == "__main__":
    main()
