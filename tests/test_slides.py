"""Whole-slide data (issue 16): lazy sources, any image size, datasets, inference, maps on disk,
saliency.

Oracles: the same program run on the image held in memory (streaming from a source must be
*bit for bit* the same run: every crop is the same region of the same transformed image);
torch autograd on the whole image (outputs, weight gradients, the image's gradient); numpy for
the transform; tifffile for what a slide holds; untiled torch runs for the maps
``streamc predict`` writes.
"""

from __future__ import annotations

import copy
import pickle
import threading
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from torch import nn
from torch.utils.data import DataLoader

import zoo
from streamc.analysis import analyze
from streamc.cli import main
from streamc.compiler import compile as compile_program
from streamc.data import (
    ArraySource,
    SlideDataset,
    SlideError,
    SourceBatch,
    Transform,
    collate_slides,
    open_slide,
    region,
)
from streamc.data.prefetch import CropReader
from streamc.data.writers import MapWriter, read_map
from streamc.errors import InputError
from streamc.export import export_torch
from streamc.predict import fully_local_outputs, predict, program_model, saliency
from streamc.program import load
from streamc.runtime.any_size import AnySizeModel
from streamc.runtime.module import StreamingModel
from tests import blocks
from zoo.slides import SyntheticSlide, write_pyramid

tifffile = pytest.importorskip("tifffile")
pytest.importorskip("zarr")

FULL = (slice(None),) * 4
NORMALISE = Transform(mean=(0.80, 0.59, 0.75), std=(0.2, 0.25, 0.3))

_CACHE: dict = {}


def resnet(size=(64, 64)):
    """The zoo's MiniResNet exported with dynamic spatial axes, and its torch twin."""
    if "resnet" not in _CACHE:
        _CACHE["resnet"] = zoo.build("resnet", (1, 3, *size), dynamic=True)
    return _CACHE["resnet"]


def resnet_program(size=(128, 128), tile=96, mode="train"):
    key = ("resnet program", size, tile, mode)
    if key not in _CACHE:
        _CACHE[key] = compile_program(resnet().onnx_model, tile=tile, image=size,
                                      with_flops=False, mode=mode, grid_end=None)
    return _CACHE[key]


def twin() -> nn.Module:
    return copy.deepcopy(resnet().module).eval()


@pytest.fixture(scope="module")
def slide_file(tmp_path_factory) -> Path:
    """A 3-level pyramidal TIFF, 160 x 136 at level 0 (0.5 µm/px), tiles of 32."""
    path = tmp_path_factory.mktemp("slides") / "slide.tif"
    return write_pyramid(path, SyntheticSlide(160, 136, label=1, seed=5), levels=3, tile=32)


class CountingSource:
    """A source that records every region read from it."""

    def __init__(self, source) -> None:
        self.source = source
        self.reads: list[tuple] = []

    @property
    def shape(self):
        return self.source.shape

    def read(self, index):
        self.reads.append(index)
        return self.source.read(index)


# --------------------------------------------------------------------------------------------
# Lazy sources


def test_slide_levels_read_what_tifffile_reads(slide_file: Path) -> None:
    for level in range(3):
        source = open_slide(slide_file, level=level, transform=Transform(scale=1.0))
        stored = tifffile.imread(slide_file, level=level)
        assert source.shape == (1, 3, *stored.shape[:2])
        crop = source.read((slice(0, 1), slice(None), slice(3, 40), slice(5, 29)))
        np.testing.assert_array_equal(crop[0], stored[3:40, 5:29].transpose(2, 0, 1))
    assert [lv.mpp for lv in open_slide(slide_file).levels()] == [0.5, 1.0, 2.0]
    assert open_slide(slide_file, mpp=1.0).level == 1


@pytest.mark.parametrize("layout", ["HWC", "CHW", "HW", "NCHW"])
def test_transform_is_applied_per_crop_exactly(layout: str) -> None:
    rng = np.random.default_rng(0)
    shape = {"HWC": (30, 40, 4), "CHW": (4, 30, 40), "HW": (30, 40), "NCHW": (2, 4, 30, 40)}
    raw = rng.integers(0, 256, shape[layout], dtype=np.uint8)
    channels = None if layout == "HW" else (2, 0, 1)
    mean = 0.3 if layout == "HW" else (0.1, 0.2, 0.3)
    source = ArraySource(raw, layout, Transform(mean=mean, std=0.5, channels=channels))
    # numpy on the whole image: the oracle
    x = raw.astype(np.float32)
    if layout == "HWC":
        x = x.transpose(2, 0, 1)[None]
    elif layout == "CHW":
        x = x[None]
    elif layout == "HW":
        x = x[None, None]
    if channels is not None:
        x = x[:, list(channels)]
    m = np.asarray(mean, np.float32).reshape(1, -1, 1, 1)
    expected = (x * np.float32(1 / 255) - m) / np.float32(0.5)
    whole = source.read(FULL)
    assert whole.dtype == np.float32 and whole.flags.c_contiguous
    np.testing.assert_allclose(whole, expected, rtol=1e-6, atol=1e-6)
    crop = (slice(0, 1), slice(1, 3), slice(7, 19), slice(11, 40))
    np.testing.assert_array_equal(source.read(crop), whole[crop])  # bit for bit


def test_lazy_source_equals_the_image_in_memory_bit_for_bit(slide_file: Path) -> None:
    program = resnet_program()  # for 128 x 128: a region of the 160 x 136 slide
    lazy = region(open_slide(slide_file, level=0, transform=NORMALISE), slice(16, 144),
                  slice(0, 128))
    counted = CountingSource(lazy)
    image = torch.from_numpy(lazy.read(FULL))
    stored = tifffile.imread(slide_file)[16:144, :128].transpose(2, 0, 1)[None]
    np.testing.assert_array_equal(image.numpy(), NORMALISE.apply(stored, 1))

    results = []
    for x in (counted, image):
        model = StreamingModel(program)
        out = model(x)
        (out * torch.linspace(-1, 1, out.shape[1])).sum().backward()
        results.append((out.detach(), {k: p.grad for k, p in model.named_parameters()}))
    (out_lazy, grads_lazy), (out_mem, grads_mem) = results
    assert torch.equal(out_lazy, out_mem)
    assert all(torch.equal(grads_lazy[k], grads_mem[k]) for k in grads_mem)
    # Every read is one tile's crop (never the whole image), in forward and again in backward.
    crops = [tuple((s.start, s.stop) for s in index[2:]) for index in counted.reads]
    tiles = {tuple(map(tuple, t.crop)) for t in program.tiles}
    assert len(crops) == 2 * len(program.tiles) and set(crops) == tiles
    assert all((b - a) * (d - c) < 128 * 128 for (a, b), (c, d) in crops)


def test_crop_reader_reads_ahead_and_tolerates_another_order() -> None:
    source = CountingSource(ArraySource(np.arange(2 * 30 * 3, dtype=np.uint8).reshape(2, 30, 3)))
    plan = [(slice(0, 1), slice(None), slice(0, 2), slice(a, a + 5)) for a in (0, 5, 10)]
    second_read = threading.Event()
    read = source.read
    source.read = lambda index: (second_read.set() if index == plan[1] else None, read(index))[1]
    with CropReader(source, plan) as reader:
        first = reader.read(plan[0])
        # the next crop is read on the thread without being asked for
        assert second_read.wait(10)
        np.testing.assert_array_equal(first, source.source.read(plan[0]))
        np.testing.assert_array_equal(reader.read(plan[2]), source.source.read(plan[2]))
        assert reader.synchronous == 1 and reader.prefetched == 1


# --------------------------------------------------------------------------------------------
# Any image size


def test_mixed_sizes_train_through_one_model_with_one_program_per_size(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    sizes = [(64, 64), (72, 96), (96, 64), (80, 80), (64, 112)]
    images = [ArraySource(rng.integers(0, 256, (*s, 3), dtype=np.uint8), "HWC", NORMALISE)
              for s in sizes]
    model = AnySizeModel(resnet().onnx_model, 64, tmp_path / "cache", template_size=(64, 64),
                         keep_runtimes=len(sizes), weights="inputs")  # sessions built once
    reference = twin()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    ref_optimizer = torch.optim.SGD(reference.parameters(), lr=0.05)
    ref_params = dict(reference.named_parameters())
    for epoch in range(2):
        compiled = model.cache.stats.compiled
        for k, source in enumerate(images):
            loss = model(source).square().mean()
            optimizer.zero_grad()
            loss.backward()
            ref_loss = reference(torch.from_numpy(source.read(FULL))).square().mean()
            ref_optimizer.zero_grad()
            ref_loss.backward()
            if k in (0, 2):  # gradients equal torch's on this size's full image
                for name, p in model.onnx_parameters.items():
                    want = ref_params[name].grad
                    assert (p.grad - want).abs().max() <= 1e-4 * want.abs().max() + 1e-7, name
            optimizer.step()
            ref_optimizer.step()
        if epoch == 0:
            assert model.cache.stats.compiled - compiled == len(sizes)
        else:
            assert model.cache.stats.compiled == compiled  # the second epoch compiles nothing
    assert "5 train" in model.programs
    # A new process (a new cache object) loads every program from the directory (inference
    # takes the training programs there).
    again = AnySizeModel(resnet().onnx_model, 64, tmp_path / "cache", template_size=(64, 64))
    with torch.no_grad():
        for source in images:
            again(source)
    assert again.cache.stats.compiled == 0
    assert again.cache.stats.loaded == len(sizes)  # the template, then 4 (64x64 is in memory)


def test_eval_runs_inference_programs_and_a_list_of_sizes_joins(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    sources = [ArraySource(rng.integers(0, 256, (*s, 3), dtype=np.uint8), "HWC", NORMALISE)
               for s in [(64, 64), (88, 72)]]
    model = AnySizeModel(resnet().onnx_model, 64, template_size=(64, 64)).eval()
    with torch.no_grad():
        joined = model(sources)
    assert model.program.meta.mode == "inference"
    assert model.cache.stats.compiled == 2  # the template and (88, 72), both inference
    separate = torch.cat([twin()(torch.from_numpy(s.read(FULL))) for s in sources]).detach()
    assert torch.allclose(joined, separate, rtol=1e-4, atol=1e-5)
    out = model(sources[1])  # eval() with autograd on: forward-only all the same
    assert not out.requires_grad
    # an image that requires a gradient gets a saliency program, and its gradient
    x = torch.from_numpy(sources[1].read(FULL)).requires_grad_()
    model(x)[0, 1].backward()
    assert model.program.meta.mode == "saliency"
    exact, float32 = _input_gradients(twin(), x.detach().numpy(), lambda y: y[0, 1])
    _assert_close_to(x.grad, exact, float32)


def test_inference_program_has_no_backward_graphs(tmp_path: Path) -> None:
    inference = resnet_program(mode="inference")
    training = resnet_program()
    assert inference.meta.mode == "inference"
    assert not any("backward" in name for name in inference.graphs)
    assert all(not c.gradients and not c.backward for c in inference.meta.classes)
    assert inference.memory_plan is None
    inference.save(tmp_path / "inference.streamc")
    loaded = load(tmp_path / "inference.streamc")
    image = torch.randn(1, 3, 128, 128)
    out = StreamingModel(loaded)(image)
    assert not out.requires_grad
    assert torch.equal(out, StreamingModel(training)(image).detach())


# --------------------------------------------------------------------------------------------
# Dataset and DataLoader


def test_dataset_from_csv_with_dataloader_workers(tmp_path: Path) -> None:
    rows = ["path,label,level"]
    slides = []
    for k, (h, w) in enumerate([(96, 80), (64, 72), (96, 80)]):
        slide = SyntheticSlide(h, w, label=k % 2, seed=k)
        write_pyramid(tmp_path / f"s{k}.tif", slide, levels=2, tile=32)
        rows.append(f"s{k}.tif,{k % 2},{k % 2}")
        slides.append(slide)
    (tmp_path / "slides.csv").write_text("\n".join(rows) + "\n")
    dataset = SlideDataset.from_csv(tmp_path / "slides.csv", transform=Transform(scale=1.0))
    assert len(dataset) == 3
    assert dataset.sizes() == {(96, 80): 2, (32, 36): 1}  # two programs for this dataset
    source, label = dataset[1]
    assert pickle.loads(pickle.dumps(source))._opened is None  # no file handle travels
    loader = DataLoader(dataset, batch_size=1, num_workers=2, collate_fn=collate_slides)
    seen = []
    for k, (images, labels) in enumerate(loader):
        assert isinstance(images, SourceBatch) and labels.tolist() == [k % 2]
        level = k % 2
        expected = slides[k].region(slice(None), slice(None), level).transpose(2, 0, 1)
        np.testing.assert_array_equal(images.read(FULL)[0], expected)
        seen.append(images.shape)
    assert seen == [(1, 3, 96, 80), (1, 3, 32, 36), (1, 3, 96, 80)]
    mixed, labels = collate_slides([dataset[0], dataset[1]])
    assert isinstance(mixed, list) and labels.tolist() == [0, 1]
    same, _ = collate_slides([dataset[0], dataset[2]])
    assert isinstance(same, SourceBatch) and same.shape == (2, 3, 96, 80)
    np.testing.assert_array_equal(same.read(FULL)[1], dataset[2][0].read(FULL)[0])


@pytest.mark.parametrize("case, fragment", [
    ("missing", "does not exist"),
    ("level", "has no level 7; its levels are 0: 160x136"),
    ("mpp", "has no level at 0.7 µm/px"),
    ("text", "is not an image streamc can read"),
    ("csv", "has no 'path' column"),
])
def test_bad_slides_are_one_clear_sentence(slide_file: Path, tmp_path: Path, case: str,
                                           fragment: str) -> None:
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "list.csv").write_text("file,label\na.tif,1\n")
    with pytest.raises(SlideError) as info:
        if case == "missing":
            open_slide(tmp_path / "nowhere.tif")
        elif case == "level":
            open_slide(slide_file, level=7)
        elif case == "mpp":
            open_slide(slide_file, mpp=0.7)
        elif case == "text":
            open_slide(tmp_path / "notes.txt")
        else:
            SlideDataset.from_csv(tmp_path / "list.csv")
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_openslide_backend_reads_what_tifffile_reads(slide_file: Path) -> None:
    pytest.importorskip("openslide")
    for level in (0, 1):
        a = open_slide(slide_file, level=level, backend="openslide", transform=NORMALISE)
        b = open_slide(slide_file, level=level, backend="tifffile", transform=NORMALISE)
        index = (slice(0, 1), slice(None), slice(9, 60), slice(3, 50))
        np.testing.assert_array_equal(a.read(index), b.read(index))


# --------------------------------------------------------------------------------------------
# Maps on disk: predict and saliency


class SegNet(nn.Module):
    """A fully local two-class segmentation network ending in a softmax over channels."""

    def __init__(self) -> None:
        super().__init__()
        self.unet = zoo.make_module("unet")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.unet(x), dim=1)


@pytest.mark.parametrize("suffix", [".tif", ".zarr", ".npy"])
def test_predict_writes_the_map_of_an_untiled_run(slide_file: Path, tmp_path: Path,
                                                  suffix: str) -> None:
    torch.manual_seed(0)
    net = SegNet().eval()
    model = export_torch(net, (1, 3, 48, 48))
    program = compile_program(model, tile=40, image=(48, 48), with_flops=False,
                              mode="inference")
    assert fully_local_outputs(program) == {"logits": "logits"}
    source = open_slide(slide_file, level=0, transform=NORMALISE)
    result = predict(program, source, tmp_path / f"map{suffix}")
    assert result.compiled and result.tiles > 4  # compiled for the slide's 160x136
    written = read_map(tmp_path / f"map{suffix}")
    assert written.shape == (160, 136, 2) and written.dtype == np.float32
    if suffix == ".tif":
        with tifffile.TiffFile(tmp_path / "map.tif") as tf:
            assert tf.pages[0].is_tiled
    np.testing.assert_allclose(written.sum(axis=2), 1.0, atol=1e-5)  # probabilities
    with torch.no_grad():  # an untiled run on a crop: its centre is the map's
        window = source.read((slice(0, 1), slice(None), slice(40, 120), slice(30, 100)))
        expected = net(torch.from_numpy(window))[0].numpy().transpose(1, 2, 0)
    np.testing.assert_allclose(written[56:104, 46:84], expected[16:64, 16:54], atol=2e-6)
    assert result.written.preview.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left


def test_predict_refuses_a_head_it_cannot_stream_and_writes_features(slide_file: Path,
                                                                     tmp_path: Path) -> None:
    program = resnet_program(size=(160, 136), tile=96, mode="inference")
    source = open_slide(slide_file, transform=NORMALISE)
    with pytest.raises(InputError, match="not fully local"):
        predict(program, source, tmp_path / "out.tif")
    result = predict(program, source, tmp_path / "features.npy", features=True)
    features = read_map(tmp_path / "features.npy")
    with torch.no_grad():
        net = twin()
        x = net.layer2(net.layer1(net.maxpool(net.relu(net.bn1(net.conv1(
            torch.from_numpy(source.read(FULL))))))))
    np.testing.assert_allclose(features, x[0].numpy().transpose(1, 2, 0), rtol=1e-4,
                               atol=1e-5)
    (pool,) = analyze(program_model(program), (160, 136)).split.final_reductions
    assert result.tensor == pool.tensor  # the map the classifier's pool reduces tile by tile


def _input_gradients(module: nn.Module, image: np.ndarray, objective) -> tuple:
    """torch's gradient of ``objective(output)`` with respect to the image, float64 and
    float32."""
    grads = []
    for dtype in (torch.float64, torch.float32):
        net = copy.deepcopy(module).to(dtype)
        x = torch.from_numpy(image).to(dtype).requires_grad_()
        objective(net(x)).backward()
        grads.append(x.grad.double())
    return grads


def _assert_close_to(grad: torch.Tensor, exact: torch.Tensor, float32: torch.Tensor) -> None:
    scale = exact.abs().max()
    error = ((grad.double() - exact).abs().max() / scale).item()
    noise = ((float32 - exact).abs().max() / scale).item()
    assert error <= max(1e-5, 4 * noise), (error, noise)


def test_saliency_equals_torchs_input_gradient(slide_file: Path, tmp_path: Path) -> None:
    program = resnet_program(mode="saliency")
    assert program.meta.classes[0].gradients == {"image": "image_grad"}
    image = open_slide(slide_file, transform=NORMALISE).read(FULL)[:, :, :128, :128].copy()
    exact, float32 = _input_gradients(twin(), image, lambda y: y[0, 3])
    x = torch.from_numpy(image).requires_grad_()
    StreamingModel(program)(x)[0, 3].backward()  # through torch autograd
    _assert_close_to(x.grad, exact, float32)
    # Streamed into a tiled TIFF through the CLI's path: the loss of a label this time.
    source = ArraySource(image, "NCHW", Transform(scale=1.0))
    result = saliency(program, source, tmp_path / "saliency.tif", label=1)
    exact, float32 = _input_gradients(
        twin(), image, lambda y: nn.functional.cross_entropy(y, torch.tensor([1])))
    written = torch.from_numpy(read_map(tmp_path / "saliency.tif").transpose(2, 0, 1)[None])
    _assert_close_to(written, exact, float32)
    assert result.objective == "the cross-entropy loss of label 1"


def test_saliency_through_whole_image_statistics() -> None:
    """A multi-stage program (squeeze-and-excitation): the image gradient flows back through
    the global graphs between stages."""
    torch.manual_seed(0)
    module = zoo.randomize_parameters(blocks.SENet("mobilenet")).eval()
    model = export_torch(module, (1, 3, 48, 40))
    program = compile_program(model, tile=32, image=(48, 40), with_flops=False,
                              mode="saliency")
    assert len(program.meta.stages) > 1
    image = np.random.default_rng(0).standard_normal((1, 3, 48, 40)).astype(np.float32)
    x = torch.from_numpy(image).requires_grad_()
    StreamingModel(program)(x).sum().backward()
    exact, float32 = _input_gradients(module, image, lambda y: y.sum())
    _assert_close_to(x.grad, exact, float32)


def test_map_writer_adds_overlapping_blocks(tmp_path: Path) -> None:
    writer = MapWriter(tmp_path / "sum.npy", (1, 2, 20, 30), preview=None)
    expected = np.zeros((1, 2, 20, 30), np.float32)
    rng = np.random.default_rng(0)
    for box in [(0, 12, 0, 18), (8, 20, 10, 30), (5, 15, 5, 25)]:
        index = (slice(None), slice(None), slice(*box[:2]), slice(*box[2:]))
        value = rng.standard_normal((1, 2, box[1] - box[0], box[3] - box[2])).astype(np.float32)
        writer[index] += value
        expected[index] += value
    writer.finish()
    np.testing.assert_array_equal(read_map(tmp_path / "sum.npy"), expected[0].transpose(1, 2, 0))


def test_map_writer_holds_one_band_at_a_time(tmp_path: Path) -> None:
    """Finishing a map (its preview and its TIFF) reads it band by band: what it allocates
    does not grow with the map (the preview is at most 1024 px a side)."""
    import tracemalloc

    def finish_peak(side: int) -> int:
        writer = MapWriter(tmp_path / f"map{side}.tif", (1, 2, side, side))
        writer[(slice(None), slice(None), slice(0, side), slice(0, 64))] = np.ones(
            (1, 2, side, 64), np.float32)
        tracemalloc.start()
        try:
            writer.finish(progress=False)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    small, large = finish_peak(2048), finish_peak(4096)
    map_growth = (4096**2 - 2048**2) * 2 * 4
    assert large - small < map_growth / 8, f"{small} -> {large} bytes"
    assert read_map(tmp_path / "map4096.tif")[:, :64].min() == 1.0


# --------------------------------------------------------------------------------------------
# Command line


def run(*args: str):
    result = CliRunner().invoke(main, list(map(str, args)), catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture(scope="module")
def unet_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("models") / "unet.onnx"
    onnx.save(zoo.build("unet", (1, 3, 48, 48), dynamic=True).onnx_model, path)
    return path


def test_cli_predict_and_saliency(slide_file: Path, unet_file: Path, tmp_path: Path) -> None:
    program = tmp_path / "unet.streamc"
    code, out, err = run("compile", unet_file, "--image", "80x68", "--tile", "48",
                         "--inference", "-o", program)
    assert code == 0, err
    assert load(program).meta.mode == "inference"
    code, out, err = run("predict", program, slide_file, "--level", "1", "-o",
                         tmp_path / "heat.tif")
    assert code == 0, err
    assert "written:      " in out and (tmp_path / "heat.preview.png").exists()
    heat = read_map(tmp_path / "heat.tif")
    assert heat.shape == (80, 68, 2)
    # An existing output is refused without --force, replaced with it.
    code, _, err = run("predict", program, slide_file, "--level", "1", "-o",
                       tmp_path / "heat.tif")
    assert code == 2 and "exists" in err and len(err.strip().splitlines()) == 1
    code, _, err = run("predict", program, slide_file, "--level", "1", "-o",
                       tmp_path / "heat.tif", "--force")
    assert code == 0, err
    code, out, err = run("saliency", unet_file, slide_file, "--tile", "48", "--mpp", "2",
                         "--class", "1", "-o", tmp_path / "sal.npy")
    assert code == 0, err
    assert read_map(tmp_path / "sal.npy").shape == (40, 34, 3)
    assert "the score of class 1" in out


@pytest.mark.parametrize("args, fragment", [
    (["{program}", "{tmp}/missing.tif"], "does not exist"),
    (["{program}", "{slide}", "--level", "5"], "has no level 5"),
    (["{program}", "{tmp}/notes.txt"], "is not an image streamc can read"),
    (["{tmp}/nothing.streamc", "{slide}"], "no such program directory"),
    (["{unet}", "{slide}"], "give the tile"),
    (["{program}", "{slide}", "--mean", "a,b"], "numbers separated by commas"),
])
def test_cli_bad_input_is_one_line(slide_file: Path, unet_file: Path, tmp_path: Path,
                                   args: list[str], fragment: str) -> None:
    program = tmp_path / "unet.streamc"
    compile_program(str(unet_file), 48, image=(160, 136), mode="inference").save(program)
    (tmp_path / "notes.txt").write_text("not an image")
    fill = {"program": program, "slide": slide_file, "tmp": tmp_path, "unet": unet_file}
    code, _, err = run("predict", *[a.format(**fill) for a in args], "-o", tmp_path / "o.tif")
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err and fragment in lines[0], err
    assert not (tmp_path / "o.tif").exists()
