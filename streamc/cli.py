"""The ``streamc`` command line: demo, inspect, compile, check, plan, predict, saliency,
example-model.

Exit status: 0 success; 1 ``check`` found a mismatch; 2 a usage error or a user error (a
:class:`~streamc.errors.StreamcError`: bad input, a model streamc cannot stream, a file it cannot
read or write, not enough memory), one line on stderr; 3 an internal error, one line on stderr
(set STREAMC_DEBUG=1 for the traceback); 130 interrupted (Ctrl-C). Never a traceback otherwise.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from collections.abc import Callable
from functools import wraps
from pathlib import Path

import click

from streamc.errors import StreamcError
from streamc.passes.schedule import DEFAULT_HALO, HALO_MODES, MAX_TILES
from streamc.units import format_bytes, parse_bytes, parse_extent


def _fail_cleanly(func: Callable) -> Callable:
    @wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except StreamcError as exc:
            _error(str(exc))
        except (click.exceptions.Exit, click.ClickException):
            raise
        except KeyboardInterrupt:
            click.echo("streamc: interrupted; a program being written was not installed.",
                       err=True)
            sys.exit(130)
        except BrokenPipeError:  # output piped into `head` and closed early
            sys.stderr.close()
            sys.exit(0)
        except MemoryError:
            _error("out of memory: use a smaller image or tile (streamc plan tells what a "
                   "size needs), or a machine with more memory.")
        except OSError as exc:  # the file system refused: permissions, a full disk...
            where = f": {exc.filename}" if exc.filename else ""
            _error(f"{exc.strerror or type(exc).__name__}{where}.")
        except Exception as exc:  # never a traceback from deep inside a library
            if os.environ.get("STREAMC_DEBUG"):
                traceback.print_exc()
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            click.echo(
                f"streamc: internal error: {type(exc).__name__}: {first} "
                "(set STREAMC_DEBUG=1 for details; please report it)",
                err=True,
            )
            sys.exit(3)

    return wrapper


def _error(message: str) -> None:
    click.echo(f"streamc: error: {' '.join(message.split())}", err=True)
    sys.exit(2)


def parse_image(text: str | None) -> tuple[int, ...] | None:
    """``"1024x768"`` / ``"64x64x64"`` / ``"512"`` -> a tuple of ints (None stays None); one
    number stands for every spatial axis of the model."""
    if text is None:
        return None
    return parse_extent(text, "image size")


def _check_writable(path: Path) -> None:
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise StreamcError(f"{path} is a directory: give a file name for the plot.")
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise StreamcError(f"cannot write {path}: {parent} is not a writable directory.")


def _say(line: str) -> None:
    click.echo(f"streamc: {line}", err=True)


def _fmt_shape(shape) -> str:
    return "x".join("?" if d is None else str(d) for d in shape) if shape is not None else "?"


def _fmt_stride(values) -> str:
    return "x".join(str(v) for v in values)


class _Streamc(click.Group):
    """The command group, with usage errors as one line on stderr (exit status 2)."""

    def main(self, *args, **kwargs):  # noqa: ANN002, ANN003 - click's signature
        standalone = kwargs.pop("standalone_mode", True)
        try:
            return super().main(*args, standalone_mode=False, **kwargs)
        except click.exceptions.NoArgsIsHelpError as exc:
            click.echo(exc.ctx.get_help() if exc.ctx else "", err=True)
            code = 2
        except click.UsageError as exc:
            command = exc.ctx.command_path if exc.ctx else "streamc"
            click.echo(f"streamc: usage error: {' '.join(exc.format_message().split())} "
                       f"(see {command} --help)", err=True)
            code = exc.exit_code
        except click.ClickException as exc:
            click.echo(f"streamc: error: {' '.join(exc.format_message().split())}", err=True)
            code = exc.exit_code
        except click.exceptions.Abort:
            click.echo("streamc: interrupted.", err=True)
            code = 130
        except click.exceptions.Exit as exc:
            code = exc.exit_code
        else:
            code = 0
        if not standalone:
            return code
        sys.exit(code)


@click.group(cls=_Streamc)
@click.version_option(package_name="streamc")
def main() -> None:
    """streamc: train CNNs on images far larger than memory, tile by tile, exactly."""


@main.command()
@click.argument("model", type=str)
@click.option("--image", help="Spatial size HxW (or DxHxW) to analyse at.")
@click.option("--input", "input_name", help="Name of the image input (if ambiguous).")
@click.option("--json", "as_json", is_flag=True, help="Print the analysis as JSON.")
@_fail_cleanly
def inspect(model: str, image: str | None, input_name: str | None, as_json: bool) -> None:
    """Show the locality split, cut tensors and per-tensor receptive fields of MODEL."""
    from streamc.analysis import analyze

    analysis = analyze(model, parse_image(image), input_name)
    data = analysis.to_dict()
    if as_json:
        click.echo(json.dumps(data, indent=1))
        return
    click.echo(f"model:        {model}")
    click.echo(f"image input:  {analysis.input_name} {_fmt_shape(analysis.image_shape)}")
    click.echo(f"prefix:       {data['prefix_nodes']} local nodes")
    head = ", ".join(f"{op}×{n}" if n > 1 else op for op, n in data["head_ops"].items())
    click.echo(f"head:         {data['head_nodes']} nodes ({head or 'none'})")
    click.echo(f"alignment:    tile origins must be multiples of {_fmt_stride(analysis.alignment)}")
    for stop in analysis.stops[:3]:
        click.echo(f"prefix stops: {stop.sentence()}")
    if len(analysis.split.stage_io) > 1 or analysis.split.global_nodes:
        click.echo(f"stages:       {len(analysis.split.stage_io)} (each whole-image statistic "
                   "is summed over the tiles before the next stage)")
        for line in analysis.stage_lines():
            click.echo(f"  {line}")
    share = analysis.streamed_share()
    if share is not None:
        click.echo(f"streamed:     {share.sentence()}")
        from streamc.compiler import share_notes

        for note in share_notes(analysis, share):
            click.echo(f"note:         {note}")
    reduced = analysis.reduced_ends
    click.echo("cut tensors: (the head reads them whole, or reduces them tile by tile)")
    for cut in analysis.ends:
        info = analysis.tensors[cut]
        how = f"  reduced tile by tile ({reduced[cut]})" if cut in reduced else ""
        click.echo(
            f"  {cut}  shape {_fmt_shape(info.shape)}  stride {_fmt_stride(info.stride)}  "
            f"receptive field {_fmt_stride(info.receptive_field)}  "
            f"offset {_fmt_stride(info.offset)}{how}"
        )
    click.echo("")
    rows = [("tensor", "op", "shape", "stride", "field", "offset")]
    for info in analysis.tensors.values():
        rows.append((info.name, info.op, _fmt_shape(info.shape), _fmt_stride(info.stride),
                     _fmt_stride(info.receptive_field), _fmt_stride(info.offset)))
    widths = [min(48, max(len(r[i]) for r in rows)) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(cell[:48].ljust(w) for cell, w in zip(row, widths)).rstrip())


_HALO = click.option(
    "--halo", type=click.Choice(HALO_MODES), default=DEFAULT_HALO, show_default=True,
    help="reuse: every activation computed once, tiles hand on the strips around them; "
         "recompute: every tile recomputes its halo (independent tiles, for --workers).")

def _parse_keep_tiles(ctx: click.Context, param: click.Parameter, value: str | None
                      ) -> int | str | None:
    if value is None or value == "auto":
        return value
    try:
        count = int(value)
    except ValueError:
        count = -1
    if count < 0:
        raise click.BadParameter(f"{value!r}: give a number of tiles (0 or more) or 'auto'.")
    return count


_KEEP_TILES = click.option(
    "--keep-tiles", default=None, callback=_parse_keep_tiles, metavar="N|auto",
    help="Tiles (of the last stage, those whose backward runs first) that keep their "
         "activations instead of recomputing them: memory for time. auto (with "
         "--memory-budget): as many as the budget leaves room for. Default: the ones that cost "
         "no memory (the last tile).")


def _check_keep_tiles(keep_tiles: int | str | None, memory_budget: str | None,
                      mode: str = "train") -> None:
    if keep_tiles == "auto" and not memory_budget:
        raise StreamcError("--keep-tiles auto spends what a memory budget leaves: give "
                           "--memory-budget too, or a number of tiles.")
    if keep_tiles is not None and mode != "train":
        raise StreamcError("--keep-tiles keeps activations for training steps; an inference or "
                           "saliency program has no use for it.")


_KEEP_STRIDE = click.option(
    "--keep-stride", type=click.IntRange(min=1), default=None, metavar="S",
    help="Every tile of the last stage keeps its activations at cumulative stride S or more "
         "(the deep, small ones) instead of recomputing them: memory for time.")


def _parse_grid_end(_ctx, _param, value: str | None):
    if value is None or value == "none":
        return None
    if value == "auto":
        return "auto"
    names = [n.strip() for n in value.split(",") if n.strip()]
    if not names:
        raise click.BadParameter(f"{value!r}: give auto, none or tensor names.")
    return names


_GRID_END = click.option(
    "--grid-end", default="auto", callback=_parse_grid_end, metavar="auto|none|TENSOR[,...]",
    help="End the grid early; the rest of the network runs on whole tensors in the head. "
         "auto (default; training): at the shallowest stride boundary where that raises the "
         "planned peak by at most 10%; none: where the local ops end; or grid tensor names "
         "(streamc inspect lists them).")


def _check_keep_stride(keep_stride: int | None, keep_tiles: int | str | None,
                       mode: str = "train") -> None:
    if keep_stride is not None and mode != "train":
        raise StreamcError("--keep-stride keeps activations for training steps; an inference or "
                           "saliency program has no use for it.")
    if keep_stride is not None and keep_tiles == "auto":
        raise StreamcError("--keep-tiles auto fills the budget with whole kept tiles: give it or "
                           "--keep-stride, not both.")


_WORKERS = click.option(
    "--workers", type=click.IntRange(min=1), default=1, show_default=True,
    help="Tile-parallel workers per image: show each one's tiles, FLOPs and peak memory.")


def _default_output(model: str) -> Path:
    path = Path(model)
    return path.with_name(path.stem + ".streamc")


def _print_program_summary(program, out: Path | None) -> None:
    meta = program.meta
    tile = f"tile {_fmt_stride(meta.tile)} px"
    if meta.halo == "reuse" and any(t > r for t, r in zip(meta.tile, meta.requested_tile)):
        tile = (f"tile {_fmt_stride(meta.requested_tile)} px (crops up to "
                f"{_fmt_stride(meta.tile)} px with the halo of the ops that read the image)")
    click.echo(f"tiles:        {len(program.tiles)} ({' x '.join(map(str, meta.grid))} grid, "
               f"{len(program.classes)} shape classes), {tile}")
    if len(meta.stages) > 1:
        heads = set(meta.head.inputs)
        kept = [b for b in meta.buffers if b.kind == "grid" and b.name not in heads]
        click.echo(f"stages:       {len(meta.stages)}, with {len(meta.globals)} global graphs "
                   f"between them; {len(kept)} tensors kept whole between stages "
                   f"({format_bytes(sum(b.nbytes for b in kept))}, and as much for their "
                   "gradients)")
    if meta.streamed is not None:
        click.echo(f"streamed:     {meta.streamed['flops']:.0%} of the forward FLOPs, "
                   f"{meta.streamed['activations']:.0%} of the activation memory")
    if meta.flops is not None:
        click.echo(f"recompute:    forward {meta.flops.forward_overhead:.3f}x, backward "
                   f"{meta.flops.backward_overhead:.3f}x the untiled FLOPs (whose backward "
                   "recomputes the forward once; "
                   + ("halo reuse: every activation computed once per pass"
                      if meta.halo == "reuse" else "every tile recomputes its halo") + ")")
    if meta.kept:
        kept_tiles = meta.kept_tiles
        if meta.keep_stride is not None:
            which = (f"{kept_tiles} tiles keep their activations at stride "
                     f"{meta.keep_stride} or more for the backward pass and recompute the rest")
        elif len(program.tiles) == 1:
            which = "the one tile keeps its activations: a step recomputes nothing"
        elif kept_tiles == len(program.tiles):
            which = "every tile keeps its activations for the backward pass: no recompute"
        elif kept_tiles == 1:
            which = "the last tile keeps its activations for the backward pass (no recompute there)"
        else:
            which = (f"{kept_tiles} tiles keep their activations for the backward pass (no "
                     "recompute there)")
        click.echo(f"kept:         {which}")
    if meta.grid_end:
        click.echo(f"grid end:     ended early at {', '.join(meta.grid_end)}: the rest runs on "
                   "whole tensors in the head (--grid-end none keeps the grid whole)")
    bands = [b for b in meta.buffers if b.kind == "band"]
    if bands:
        click.echo(f"strips:       {len(bands)} bands handed on between tiles "
                   f"({format_bytes(sum(b.nbytes for b in bands))}, kept for the backward pass)")
    for cut in meta.cut_tensors:
        if cut.kind == "global":
            click.echo(f"head reads:   {cut.name} {_fmt_shape(cut.shape)}, a whole-image "
                       "reduction summed from each tile's part")
            continue
        click.echo(f"cut tensor:   {cut.name} {_fmt_shape(cut.shape)} stride "
                   f"{_fmt_stride(cut.stride)}")
    plan = meta.memory_plan
    if plan and "headline" in plan:
        click.echo(f"memory:       {plan['headline']}")
    for note in meta.notes:
        click.echo(f"note:         {note}")
    if out is not None:
        click.echo(f"written to:   {out}")


@main.command("compile")
@click.argument("model", type=str)
@click.option("--tile", help="Largest tile (input crop) size: 2048 or 2048x1536.")
@click.option("--image", help="Image size HxW (required if the model's size is dynamic).")
@click.option("--input", "input_name", help="Name of the image input (if ambiguous).")
@click.option("-o", "--output", type=click.Path(), help="Program directory (MODEL.streamc).")
@click.option("--memory-budget", help="Choose the tile for this peak memory, e.g. 4GiB.")
@click.option("--force", is_flag=True,
              help="Replace -o even when it is a directory that is not a streamc program.")
@click.option("--max-tiles", type=click.IntRange(min=1), default=MAX_TILES, show_default=True,
              help="Refuse a tile so small that the grid needs more tiles than this.")
@click.option("--inference", is_flag=True,
              help="Forward graphs only (no training): smaller and faster to build.")
@click.option("--saliency", is_flag=True,
              help="Backward graphs that give the image's gradient instead of the weights'.")
@_HALO
@_KEEP_TILES
@_KEEP_STRIDE
@_GRID_END
@_WORKERS
@_fail_cleanly
def compile_command(model: str, tile: str | None, image: str | None, input_name: str | None,
                    output: str | None, memory_budget: str | None, force: bool,
                    max_tiles: int, inference: bool, saliency: bool, halo: str,
                    keep_tiles: int | str | None, keep_stride: int | None,
                    grid_end: str | list[str] | None, workers: int) -> None:
    """Compile MODEL into a tiled training (or inference, or saliency) program directory."""
    from streamc.compiler import compile as compile_program
    from streamc.program import check_target

    if tile and memory_budget:
        raise StreamcError("give either --tile or --memory-budget, not both.")
    if inference and saliency:
        raise StreamcError("give either --inference or --saliency, not both.")
    mode = "inference" if inference else "saliency" if saliency else "train"
    _check_keep_tiles(keep_tiles, memory_budget, mode)
    _check_keep_stride(keep_stride, keep_tiles, mode)
    if memory_budget and (inference or saliency):
        raise StreamcError("--memory-budget plans training steps: give a tile (--tile) with "
                           "--inference or --saliency.")
    if not tile and not memory_budget:
        raise StreamcError("give a tile size (--tile 2048) or a memory budget (--memory-budget).")
    _refuse_workers_with_reuse(workers, halo)
    target = Path(output) if output else _default_output(model)
    check_target(target, force)  # before any work
    if memory_budget:
        from streamc.tile_search import search_tiles

        search = search_tiles(model, parse_image(image), budget=parse_bytes(memory_budget),
                              input=input_name, progress=_say, max_tiles=max_tiles,
                              halo=halo, keep_tiles=keep_tiles, keep_stride=keep_stride,
                              grid_end=grid_end)
        program = search.chosen.program
        click.echo(f"memory budget {memory_budget}: chose tile {search.chosen.tile} "
                   f"({search.compiled} candidate{'s' if search.compiled > 1 else ''} compiled, "
                   f"each once)")
    else:
        program = compile_program(model, tile, image=parse_image(image), input=input_name,
                                  max_tiles=max_tiles, mode=mode, halo=halo,
                                  keep_tiles=keep_tiles, keep_stride=keep_stride,
                                  grid_end=grid_end)
    out = program.save(target, force=force)
    _print_program_summary(program, out)
    _print_worker_shares(program, workers)


def _refuse_workers_with_reuse(workers: int, halo: str) -> None:
    if workers > 1 and halo == "reuse":
        raise StreamcError("--workers splits independent tiles among processes: add --halo "
                           "recompute (with halo reuse, tiles hand strips to each other).")


def _print_worker_shares(program, workers: int) -> None:
    if workers > 1:
        from streamc.passes.partition import share_lines

        click.echo("\n".join(share_lines(program, workers)))


@main.command()
@click.argument("model", type=str)
@click.option("--image", help="Image size HxW (required if the model's size is dynamic).")
@click.option("--tile", required=True, help="Largest tile size: 2048 or 2048x1536.")
@click.option("--input", "input_name", help="Name of the image input (if ambiguous).")
@click.option("--seed", default=0, show_default=True, help="Seed of the random image.")
@click.option("--tolerance", default=1e-4, show_default=True,
              help="Largest accepted relative error.")
@click.option("--no-finite-differences", "no_fd", is_flag=True,
              help="Skip the finite-difference check of the gradients.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@_HALO
@_GRID_END
@_fail_cleanly
def check(model: str, image: str | None, tile: str, input_name: str | None, seed: int,
          tolerance: float, no_fd: bool, as_json: bool, halo: str,
          grid_end: str | list[str] | None) -> None:
    """Run the tiled program against an untiled run of MODEL and the gradients against finite
    differences; exit 1 on a mismatch."""
    from streamc.check import check as run_check

    report = run_check(model, parse_image(image), tile, input=input_name, seed=seed,
                       tolerance=tolerance, finite_difference=not no_fd, halo=halo,
                       grid_end=grid_end)
    _print_check(report, as_json)
    if not report.ok:
        sys.exit(1)


def _print_check(report, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=1))
        return
    program = report.program
    click.echo(f"tiles: {len(program.tiles)}  (image {_fmt_stride(program.image_size)}, tile "
               f"{_fmt_stride(program.meta.tile)})")
    for note in program.meta.notes:
        click.echo(f"note: {note}")
    click.echo(f"{'tensor':<40} {'max abs err':>12} {'max rel err':>12} {'allowed':>10}")
    for kind, items in (("output", report.outputs), ("grad", report.gradients)):
        for d in items:
            flag = "" if d.ok else "  <"
            click.echo(f"{kind + ' ' + d.name:<40.40} {d.max_abs:>12.3e} {d.max_rel:>12.3e} "
                       f"{d.allowed:>10.1e}{flag}")
    for d in report.directions:
        flag = "" if d.ok else "  <"
        click.echo(f"{'d/dv ' + d.name:<40.40} tiled {d.analytic:>+11.4e}  finite differences "
                   f"{d.numeric:>+11.4e}  rel {d.error:.1e}{flag}")
    worst = report.worst
    verdict = "OK" if report.ok else "MISMATCH"
    if worst is not None:
        fd = (f"; finite differences within {max(d.error for d in report.directions):.1e}"
              if report.directions else "")
        click.echo(f"{verdict}: largest relative error {worst.max_rel:.3e} ({worst.name}, "
                   f"allowed {worst.allowed:.1e}: the tolerance {report.tolerance:.0e} or 10x "
                   f"the untiled float32 noise){fd}")


@main.command()
@click.argument("model", type=str)
@click.option("--image", help="Image size HxW (required if the model's size is dynamic).")
@click.option("--tile", help="Plan this tile size only (2048 or 2048x1536).")
@click.option("--memory-budget", help="Choose the least-recompute tile that fits, e.g. 4GiB.")
@click.option("--input", "input_name", help="Name of the image input (if ambiguous).")
@click.option("--exact", is_flag=True,
              help="Plan the graphs ONNX Runtime actually runs (slower: builds sessions).")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@click.option("--plot", type=click.Path(), help="Write memory and recompute vs tile size (PNG).")
@_HALO
@_KEEP_TILES
@_KEEP_STRIDE
@_GRID_END
@_WORKERS
@_fail_cleanly
def plan(model: str, image: str | None, tile: str | None, memory_budget: str | None,
         input_name: str | None, exact: bool, as_json: bool, plot: str | None, halo: str,
         keep_tiles: int | str | None, keep_stride: int | None,
         grid_end: str | list[str] | None, workers: int) -> None:
    """Predict peak memory per training step for tile sizes of MODEL, before running anything."""
    from streamc import tile_search as ts

    if tile and memory_budget:
        raise StreamcError("give either --tile or --memory-budget, not both.")
    if workers > 1 and not (tile or memory_budget):
        raise StreamcError("--workers plans one tile: give --tile or --memory-budget too.")
    _refuse_workers_with_reuse(workers, halo)
    _check_keep_tiles(keep_tiles, memory_budget)
    _check_keep_stride(keep_stride, keep_tiles)
    if plot:  # before any work: a missing dependency or a bad path is known now
        ts.require_matplotlib()
        _check_writable(Path(plot))
    budget = parse_bytes(memory_budget) if memory_budget else None
    tiles = [max(parse_extent(tile, "tile size"))] if tile else None
    search = ts.search_tiles(model, parse_image(image), tiles=tiles, budget=budget,
                             input=input_name, exact=exact, progress=_say, halo=halo,
                             keep_tiles=keep_tiles, keep_stride=keep_stride,
                             grid_end=grid_end)
    plans, chosen = search.plans, search.chosen
    if tile:
        plan_, ends = plans[0].plan, list(plans[0].program.meta.grid_end)
        if as_json:
            report = {**plan_.to_dict(), "grid_end": ends}
            if workers > 1:
                report["workers"] = _worker_json(plans[0].program, workers)
            click.echo(json.dumps(report, indent=1))
        else:
            click.echo("\n".join(plan_.summary()))
            if ends:
                click.echo(f"grid end        ended early at {', '.join(ends)} (--grid-end none "
                           "keeps the grid whole)")
            _print_worker_shares(plans[0].program, workers)
    elif as_json:
        extra = ({"workers": _worker_json(chosen.program, workers)}
                 if chosen is not None and workers > 1 else {})
        click.echo(json.dumps({"plans": [p.to_dict() for p in plans],
                               "chosen": chosen.tile if chosen else None, **extra}, indent=1))
    else:
        analysis = search.analysis
        if chosen is not None and chosen.program.meta.grid_end:  # the chosen program's grid
            from streamc.analysis.analyze import with_grid_end

            analysis = with_grid_end(analysis, chosen.program.meta.grid_end)
        share = analysis.streamed_share()
        if share is not None:
            from streamc.compiler import share_notes

            click.echo(f"streamed: {share.sentence()}")
            for note in share_notes(analysis, share):
                click.echo(f"note: {note}")
        click.echo("\n".join(ts.plans_table(plans, chosen)))
        if chosen is not None:
            kept = (f", {chosen.kept_tiles} tiles keep their activations"
                    if chosen.kept_tiles > 1 and chosen.tiles > 1 else "")
            if chosen.program.meta.grid_end:
                kept += f", the grid ends at {', '.join(chosen.program.meta.grid_end)}"
            click.echo(f"memory budget {memory_budget}: tile {chosen.tile}{kept} "
                       f"(peak {format_bytes(chosen.peak)})")
            _print_worker_shares(chosen.program, workers)
    if plot:
        ts.plot_plans(plans, search.conventional.total, budget, plot)
        click.echo(f"plot written to {plot}")


def _worker_json(program, workers: int) -> dict:
    from streamc.passes.partition import assign_tiles, worker_plans

    assignment = assign_tiles(program, workers)
    plans = worker_plans(program, assignment)
    return {**assignment.to_json(), "peaks": [p.peak for p in plans]}


def _image_options(func: Callable) -> Callable:
    """The options that say how to read IMAGE and which program runs it."""
    options = [
        click.option("--out", "-o", "out", required=True, type=click.Path(),
                     help="Output: .tif (tiled TIFF), .zarr or .npy, (H, W, C) float32."),
        click.option("--level", type=click.IntRange(min=0),
                     help="Pyramid level of IMAGE (0: full resolution; default 0)."),
        click.option("--mpp", type=float, help="Read the level at this many µm per pixel."),
        click.option("--tile", help="Tile size, when PROGRAM is an ONNX model (or to compile "
                                    "for the image's size with another tile)."),
        click.option("--scale", type=float,
                     help="Multiply pixels by this first (default 1/255 for 8-bit images)."),
        click.option("--mean", help="Subtract this, per channel: 0.485,0.456,0.406."),
        click.option("--std", help="Then divide by this, per channel: 0.229,0.224,0.225."),
        click.option("--cache", type=click.Path(file_okay=False),
                     help="Directory that keeps compiled programs between runs."),
        click.option("--threads", type=click.IntRange(min=1), help="ONNX Runtime threads."),
        click.option("--compression", type=click.Choice(["none", "zlib"]), default="none",
                     show_default=True, help="Compression of a TIFF output."),
        click.option("--no-preview", is_flag=True, help="Do not write OUT.preview.png."),
        click.option("--force", is_flag=True, help="Replace OUT (and its preview) if present."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _numbers(text: str | None, what: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise StreamcError(f"--{what} {text!r}: give numbers separated by commas, e.g. "
                           "0.485,0.456,0.406.") from None


def _open_image(image: str, level: int | None, mpp: float | None, scale: float | None,
                mean: str | None, std: str | None):
    from streamc.data.sources import Transform, open_slide

    transform = Transform(scale=scale, mean=_numbers(mean, "mean"), std=_numbers(std, "std"))
    source = open_slide(image, level=level, mpp=mpp, transform=transform)
    where = f"level {source.level}" + (f", {source.mpp:.3g} µm/px" if source.mpp else "")
    click.echo(f"image:        {image} ({where}): {_fmt_stride(source.shape[1:])}")
    return source


def _report_map(result, program: str) -> None:
    meta = result.program.meta
    size = _fmt_stride(meta.image_size)
    how = f"compiled for {size}" if result.compiled else f"{program} ({size})"
    click.echo(f"program:      {how}, {meta.mode}, {result.tiles} tiles of at most "
               f"{_fmt_stride(meta.tile)} px")
    if result.objective is not None:
        click.echo(f"gradient of:  {result.objective} ({result.score:.6g})")
    written = result.written
    click.echo(f"written:      {written.path} ({_fmt_stride(written.shape)} {written.dtype}) in "
               f"{result.seconds:.1f} s")
    if written.preview is not None:
        click.echo(f"preview:      {written.preview}")


@main.command()
@click.argument("program", type=str)
@click.argument("image", type=str)
@_image_options
@click.option("--features", is_flag=True,
              help="Write the prefix's feature map (for a network that is not fully local).")
@click.option("--tensor", help="Write this grid tensor (a model output or a cut tensor).")
@_fail_cleanly
def predict(program: str, image: str, out: str, level: int | None, mpp: float | None,
            tile: str | None, scale: float | None, mean: str | None, std: str | None,
            cache: str | None, threads: int | None, compression: str, no_preview: bool,
            force: bool, features: bool, tensor: str | None) -> None:
    """Run PROGRAM (a program directory, or an ONNX model with --tile) on IMAGE (a slide, TIFF,
    .zarr or .npy) and write its output map tile by tile, never holding it whole."""
    from streamc.data.writers import check_map_output
    from streamc.predict import predict as run_predict

    check_map_output(Path(out), force, not no_preview)  # before any work
    source = _open_image(image, level, mpp, scale, mean, std)
    result = run_predict(program, source, out, tensor=tensor, features=features, force=force,
                         tile=tile, cache_dir=cache, threads=threads,
                         compression=None if compression == "none" else compression,
                         preview=not no_preview)
    click.echo(f"map:          {result.tensor}")
    _report_map(result, program)


@main.command()
@click.argument("program", type=str)
@click.argument("image", type=str)
@_image_options
@click.option("--class", "target", type=click.IntRange(min=0),
              help="Differentiate this class's score (default: the top class).")
@click.option("--label", type=click.IntRange(min=0),
              help="Differentiate the cross-entropy loss of this label instead.")
@_fail_cleanly
def saliency(program: str, image: str, out: str, level: int | None, mpp: float | None,
             tile: str | None, scale: float | None, mean: str | None, std: str | None,
             cache: str | None, threads: int | None, compression: str, no_preview: bool,
             force: bool, target: int | None, label: int | None) -> None:
    """Write the gradient of a class score (or of the loss for a label) with respect to IMAGE,
    tile by tile: a saliency map as large as the image."""
    from streamc.data.writers import check_map_output
    from streamc.predict import saliency as run_saliency

    if target is not None and label is not None:
        raise StreamcError("give either --class or --label, not both.")
    check_map_output(Path(out), force, not no_preview)
    source = _open_image(image, level, mpp, scale, mean, std)
    result = run_saliency(program, source, out, target=target, label=label, force=force,
                          tile=tile, cache_dir=cache, threads=threads,
                          compression=None if compression == "none" else compression,
                          preview=not no_preview)
    _report_map(result, program)


@main.command()
@click.option("-o", "--output", type=click.Path(), default="streamc-demo",
              show_default=True, help="Folder for the demo model and its program.")
@click.option("--image", default="512x512", show_default=True, help="Image size.")
@click.option("--tile", default="256", show_default=True, help="Largest tile size.")
@click.option("--channels", default=16, show_default=True, help="Width of the demo CNN.")
@_fail_cleanly
def demo(output: str, image: str, tile: str, channels: int) -> None:
    """Generate the embedded default CNN, inspect it, compile it and check it is exact."""
    import onnx

    from streamc.analysis import analyze
    from streamc.check import check as run_check
    from streamc.compiler import compile as compile_program
    from streamc.demo import demo_model

    folder = Path(output)
    folder.mkdir(parents=True, exist_ok=True)
    model_path = folder / "demo.onnx"
    onnx.save(demo_model(channels=channels), str(model_path))
    size = parse_image(image)
    click.echo(f"demo model:   {model_path} (ResNet-style, {channels} channels)")
    analysis = analyze(str(model_path), size)
    cut = analysis.ends[0]
    click.echo(f"analysis:     {len(analysis.prefix)} local nodes, cut at {cut} "
               f"(stride {_fmt_stride(analysis.tensors[cut].stride)}, receptive field "
               f"{_fmt_stride(analysis.tensors[cut].receptive_field)})")
    # The whole grid: the demo shows every local op streamed and checked (on an image this
    # small, grid_end="auto" would run all but the stem whole in the head).
    program = compile_program(str(model_path), tile, image=size, grid_end=None)
    out = program.save(folder / "demo.streamc")
    _print_program_summary(program, out)
    report = run_check(str(model_path), size, tile, program=program)
    _print_check(report, as_json=False)
    if not report.ok:
        sys.exit(1)


@main.command("example-model")
@click.argument("path", type=click.Path())
@click.option("--channels", default=16, show_default=True, help="Width of the demo CNN.")
@_fail_cleanly
def example_model(path: str, channels: int) -> None:
    """Write the embedded default CNN (dynamic H, W) to PATH as ONNX."""
    import onnx

    from streamc.demo import demo_model

    onnx.save(demo_model(channels=channels), path)
    click.echo(f"wrote {path}")


if __name__ == "__main__":  # pragma: no cover
    main()
