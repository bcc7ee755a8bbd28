"""Running a conversion: shards, parallel workers, resume, the summary (design §5).

:func:`convert` turns a list of :class:`~ps3.data.convert_common.SourceImage` into the paired
layout the trainer reads::

    OUT/images/image_00000.tar         KEY.jpg
    OUT/text_boxes/text_box_00000.tar  KEY.json
    OUT/conversion.json                what was converted, with which settings
    OUT/conversion/shard_00000.json    per shard: samples, regions and drops (written last)

Source image ``i`` belongs to shard ``i // shard_size``: a shard holds the usable images among
its ``shard_size`` sources, so shards are independent. Workers (processes) convert whole shards;
each shard pair is written atomically and its stats file comes last, so a shard is finished
exactly when its stats file exists. A rerun with the same inputs and settings skips finished
shards (resume); other settings in the same OUT are refused unless ``overwrite``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
from contextlib import ExitStack
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..runtime import UserError, user_input
from .convert_common import (DROP_REASONS, GLOBAL_CAPTION_CHOICES, DropLog, SampleOptions, SourceImage,
                             build_sample)
from .writer import IMAGE_DIR, TEXT_BOX_DIR, ShardWriter, encode_record, existing_paired_shards

__all__ = ["ConvertResult", "convert", "add_common_arguments", "options_from_args", "run_conversion",
           "summary_lines"]

MANIFEST, STATS_DIR = "conversion.json", "conversion"


@dataclass
class ConvertResult:
    """What a conversion wrote: sample and region counts, shards, drops (format reader's and
    per image), and how many shards a resumed run found finished."""

    images: int = 0
    regions: int = 0
    global_only: int = 0
    shards: list[str] = field(default_factory=list)
    resumed_shards: int = 0
    drops: DropLog = field(default_factory=DropLog)


def _check_int(name: str, value: Any, minimum: int, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UserError(f"{name} must be an int >= {minimum}, got {value!r}")


def _check_options(options: SampleOptions, shard_size: int, workers: int) -> None:
    _check_int("shard_size", shard_size, 1)
    _check_int("workers", workers, 0)
    _check_int("max_side", options.max_side, 16, optional=True)
    _check_int("jpeg_quality", options.jpeg_quality, 1)
    if options.jpeg_quality > 100:
        raise UserError(f"jpeg_quality must be in 1..100, got {options.jpeg_quality}")
    if isinstance(options.min_box_side, bool) or not isinstance(options.min_box_side, (int, float)) \
            or not options.min_box_side >= 0:
        raise UserError(f"min_box_side must be a number >= 0, got {options.min_box_side!r}")
    if options.global_caption not in GLOBAL_CAPTION_CHOICES:
        raise UserError(f"global_caption must be one of {', '.join(GLOBAL_CAPTION_CHOICES)}, "
                         f"got {options.global_caption!r}")


def _manifest(source_name: str, settings: dict[str, Any], sources: Sequence[SourceImage],
              options: SampleOptions, shard_size: int) -> dict[str, Any]:
    keys = hashlib.sha256("\n".join(s.key for s in sources).encode()).hexdigest()
    return {"source": source_name, "settings": settings, "options": asdict(options), "shard_size": shard_size,
            "images": len(sources), "keys_sha256": keys}


def _prepare(root: Path, manifest: dict[str, Any], overwrite: bool) -> None:
    """Create the layout; refuse to mix this conversion with other data in ``root``."""
    manifest_path = root / MANIFEST
    if overwrite:
        for stale in existing_paired_shards(root):
            stale.unlink()
        shutil.rmtree(root / STATS_DIR, ignore_errors=True)
        manifest_path.unlink(missing_ok=True)
    elif manifest_path.exists():
        previous = json.loads(manifest_path.read_text())
        if previous != manifest:
            changed = sorted(k for k in set(previous) | set(manifest) if previous.get(k) != manifest.get(k))
            raise UserError(f"{root} holds a conversion with other inputs or settings ({', '.join(changed)} "
                             f"differ): pass --overwrite to replace it, or choose another --out")
    elif existing_paired_shards(root):
        raise UserError(f"{root} already holds shards that no conversion there wrote: choose an empty --out "
                         f"or pass --overwrite to replace them")
    for folder in (IMAGE_DIR, TEXT_BOX_DIR, STATS_DIR):
        (root / folder).mkdir(parents=True, exist_ok=True)
    _write_json(manifest_path, manifest)


def _write_json(path: Path, data: Any) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(temporary, path)


def _shard_paths(root: Path, index: int) -> tuple[Path, Path, Path]:
    return (root / IMAGE_DIR / f"image_{index:05d}.tar", root / TEXT_BOX_DIR / f"text_box_{index:05d}.tar",
            root / STATS_DIR / f"shard_{index:05d}.json")


def _convert_shard(root: Path, index: int, sources: Sequence[SourceImage], options: SampleOptions) -> dict:
    """Convert and write one shard pair, streaming (nothing is written when no image is usable);
    returns its stats."""
    drops = DropLog()
    image_path, record_path, stats_path = _shard_paths(root, index)
    stats = {"images": 0, "regions": 0, "global_only": 0, "sources": len(sources), "shard": None}
    with ExitStack() as stack:
        writers = None
        for source in sources:
            sample = build_sample(source, options, drops)
            if sample is None:
                continue
            if writers is None:  # both renamed into place only if the whole shard succeeds
                writers = (stack.enter_context(ShardWriter(image_path)), stack.enter_context(ShardWriter(record_path)))
            writers[0].write({"__key__": sample.key, "jpg": sample.jpeg})
            writers[1].write({"__key__": sample.key, "json": encode_record(sample.record)})
            stats["images"] += 1
            stats["regions"] += len(sample.record["text"])
            stats["global_only"] += not sample.record["text"]
        stats["shard"] = image_path.name if writers is not None else None
    stats["drops"] = drops.to_json()
    _write_json(stats_path, stats)
    return stats


def _convert_shard_job(job: tuple[Path, int, Sequence[SourceImage], SampleOptions]) -> tuple[int, dict]:
    root, index, sources, options = job
    return index, _convert_shard(root, index, sources, options)


def convert(sources: Sequence[SourceImage], out_dir: str | os.PathLike, *, source_name: str,
            settings: dict[str, Any] | None = None, options: SampleOptions = SampleOptions(),
            shard_size: int = 1000, workers: int = 1, overwrite: bool = False,
            reader_drops: DropLog | None = None, progress: Callable[[int], None] | None = None) -> ConvertResult:
    """Write ``sources`` as paired shards under ``out_dir`` (see the module docstring).

    ``settings`` (JSON-able: the reader's inputs and choices) and ``options`` identify the
    conversion for resume. ``reader_drops`` are the format reader's own drops, added to the
    result. ``progress`` is called with the number of source images done after each shard.
    """
    _check_options(options, shard_size, workers)
    keys = [s.key for s in sources]
    if len(set(keys)) != len(keys):
        raise RuntimeError("internal error: a format reader produced duplicate keys")
    root = Path(out_dir)
    _prepare(root, _manifest(source_name, settings or {}, sources, options, shard_size), overwrite)
    result = ConvertResult(drops=DropLog())
    if reader_drops is not None:
        result.drops.merge(reader_drops)
    stats: dict[int, dict] = {}
    jobs = []
    for index, start in enumerate(range(0, len(sources), shard_size)):
        stats_path = _shard_paths(root, index)[2]
        if stats_path.exists():
            stats[index] = json.loads(stats_path.read_text())
            result.resumed_shards += 1
        else:
            jobs.append((root, index, sources[start:start + shard_size], options))
    if progress is not None and result.resumed_shards:
        progress(sum(s["sources"] for s in stats.values()))
    if workers <= 1 or len(jobs) <= 1:
        finished = map(_convert_shard_job, jobs)
        _collect(finished, stats, progress)
    else:
        with ProcessPoolExecutor(max_workers=min(workers, len(jobs))) as pool:
            _collect(pool.map(_convert_shard_job, jobs), stats, progress)
    for index in sorted(stats):
        shard = stats[index]
        result.images += shard["images"]
        result.regions += shard["regions"]
        result.global_only += shard["global_only"]
        if shard["shard"]:
            result.shards.append(shard["shard"])
        result.drops.merge(DropLog.from_json(shard["drops"]))
    return result


def _collect(finished, stats: dict[int, dict], progress: Callable[[int], None] | None) -> None:
    for index, shard in finished:
        stats[index] = shard
        if progress is not None:
            progress(shard["sources"])


def summary_lines(result: ConvertResult, out_dir: str | os.PathLike, reasons: dict[str, str]) -> list[str]:
    """The closing report: what was written, then every drop reason with its count and examples."""
    root = Path(out_dir)
    lines = [f"wrote {result.images} images with {result.regions} regions ({result.global_only} with a global "
             f"caption only) in {len(result.shards)} shard pair(s) to {root / IMAGE_DIR} and {root / TEXT_BOX_DIR}"]
    if result.resumed_shards:
        lines.append(f"resumed: {result.resumed_shards} shard(s) were already finished")
    if not result.drops.counts:
        lines.append("dropped: nothing")
    for reason, count in sorted(result.drops.counts.items(), key=lambda item: (-item[1], item[0])):
        lines.append(f"dropped {count:>8} {reason}: {reasons.get(reason, DROP_REASONS.get(reason, ''))}")
        for example in result.drops.examples.get(reason, []):
            lines.append(f"         e.g. {example}")
    return lines


# --------------------------------------------------------------------------------------------
# Command line


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """The output and sample-shaping flags every ``ps3 data from-*`` command has."""
    parser.add_argument("--out", required=True, help="output directory (gets images/ and text_boxes/ shards)")
    parser.add_argument("--shard-size", type=int, default=1000,
                        help="source images per shard pair (dropped images leave a shard smaller; default 1000)")
    parser.add_argument("--max-side", type=int,
                        help="downscale images whose longer side exceeds this many pixels (boxes follow); "
                             "by default JPEGs are copied byte for byte")
    parser.add_argument("--min-box-side", type=float, default=1.0,
                        help="drop boxes thinner than this many output pixels (default 1)")
    parser.add_argument("--skip-images-without-regions", action="store_true",
                        help="drop images with no usable region (default: keep them for their global caption)")
    parser.add_argument("--global-caption", choices=GLOBAL_CAPTION_CHOICES, default="first",
                        help="which of an image's captions becomes global_text: the first, the longest, or all "
                             "as consecutive sentences (default first)")
    parser.add_argument("--jpeg-quality", type=int, default=95, help="quality of re-encoded JPEGs (default 95)")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="worker processes (default: CPU count, at most 8)")
    parser.add_argument("--overwrite", action="store_true", help="replace what OUT holds instead of resuming")
    parser.add_argument("--quiet", action="store_true", help="print nothing but errors")


def options_from_args(args: argparse.Namespace) -> SampleOptions:
    return SampleOptions(max_side=args.max_side, min_box_side=args.min_box_side,
                         keep_global_only=not args.skip_images_without_regions,
                         global_caption=args.global_caption, jpeg_quality=args.jpeg_quality)


def run_conversion(args: argparse.Namespace, sources: Sequence[SourceImage], reader_drops: DropLog, *,
                   source_name: str, settings: dict[str, Any], reasons: dict[str, str]) -> int:
    """Convert for ``ps3 data from-*``; prints the summary; exit code 1 when nothing was written."""
    from tqdm import tqdm

    options = options_from_args(args)
    _check_options(options, args.shard_size, args.workers)
    if not sources:  # say why before giving up: the reader's drops explain it
        result = ConvertResult(drops=reader_drops)
        print("\n".join(summary_lines(result, args.out, reasons)[1:] + ["nothing to convert: no usable image listed"]))
        return 1
    with tqdm(total=len(sources), unit="image", desc=source_name, disable=args.quiet) as bar, \
            user_input("--out", errors=(OSError,)):
        result = convert(sources, args.out, source_name=source_name, settings=settings, options=options,
                         shard_size=args.shard_size, workers=args.workers, overwrite=args.overwrite,
                         reader_drops=reader_drops, progress=bar.update)
    if not args.quiet:
        print("\n".join(summary_lines(result, args.out, reasons)))
    return 0 if result.images else 1
