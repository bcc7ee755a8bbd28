"""``ps3 data check DIR``: read every pair of a dataset as the trainer does and report on it.

Each image/text-box pair goes through the pre-training dataset's own sample path
(:class:`ps3.train.loader.PretrainDataset` reading the shards in lockstep, decoding the image and
validating the record), so every skip the trainer would count is counted here, with up to three
examples each. The usable samples are summarised: image sizes, usable boxes per image, box areas
and caption lengths. The exit code is 1 when no sample is usable.

The trainer's reader is imported when a check runs, so importing this module (and building the
``ps3`` parser) never loads training code.
"""
from __future__ import annotations

import argparse
import io
import json
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from .convert_common import DropLog
from .shards import IMAGE_EXTENSIONS, SKIP_REASONS, iter_paired_shard, list_shard_pairs
from .writer import IMAGE_DIR, TEXT_BOX_DIR

__all__ = ["DatasetReport", "check_dataset", "report_lines", "add_arguments", "run_from_args"]

_UPRIGHT_SWAPS = (5, 6, 7, 8)  # EXIF orientations that swap width and height


class _ExampleReporter:
    """An ``on_skip`` callback that counts skips by reason and keeps a few examples."""

    strict = False

    def __init__(self) -> None:
        self.log = DropLog()

    def __call__(self, reason: str, shard: str, key: str | None, detail: str = "") -> None:
        where = Path(shard).name + (f" key {key}" if key is not None else "")
        self.log.add(reason, f"{where}: {detail}" if detail else where)


def _ignore(reason: str, shard: str, key: str | None, detail: str = "") -> None:
    """Second reading of a record for the statistics: its problems were counted already."""


@dataclass
class DatasetReport:
    """What :func:`check_dataset` found: per usable sample its size, usable boxes (area fractions),
    caption word counts; the skips with examples."""

    shard_pairs: int = 0
    pairs: int = 0
    usable: int = 0
    sizes: list[tuple[int, int]] = field(default_factory=list)
    boxes_per_image: list[int] = field(default_factory=list)
    box_area_fractions: list[float] = field(default_factory=list)
    local_words: list[int] = field(default_factory=list)
    global_words: list[int] = field(default_factory=list)
    global_only: int = 0
    skips: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)


def _upright_size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as image:
        width, height = image.size
        try:
            orientation = image.getexif().get(0x0112, 1)
        except Exception:  # malformed EXIF: the trainer keeps the stored orientation too
            orientation = 1
    return (height, width) if orientation in _UPRIGHT_SWAPS else (width, height)


def check_dataset(root: str | Path) -> DatasetReport:
    """Read every pair under ``root/images`` + ``root/text_boxes`` through the trainer's sample path."""
    from ..train.loader import DataOptions, PretrainDataset

    images, records = list_shard_pairs(Path(root) / IMAGE_DIR, Path(root) / TEXT_BOX_DIR,
                                       image_argument="DIR/images", text_box_argument="DIR/text_boxes")
    # The image size only matters for resizing, which placeholders skip: any valid size will do.
    dataset = PretrainDataset(images, records, DataOptions(image_size=16, batch_size=1, shuffle=False))
    reporter = _ExampleReporter()
    report = DatasetReport(shard_pairs=len(images))
    for image_shard, record_shard in zip(images, records):
        for pair in iter_paired_shard(image_shard, record_shard, reporter, strict=False):
            report.pairs += 1
            if dataset.read_sample(pair, "check", reporter, placeholder=True) is None:
                continue
            _add_usable(report, pair)
    report.skips, report.examples = reporter.log.counts, reporter.log.examples
    return report


def _add_usable(report: DatasetReport, pair) -> None:
    from ..train.captions import usable_captions

    image_bytes = next(pair.image[ext] for ext in IMAGE_EXTENSIONS if ext in pair.image)
    size = _upright_size(image_bytes)
    local, global_sentences = usable_captions(json.loads(pair.record["json"]), size, _ignore, pair.record_shard,
                                              pair.key)
    report.usable += 1
    report.sizes.append(size)
    report.boxes_per_image.append(len(local))
    area = size[0] * size[1]
    for sentences, (x0, y0, x1, y1) in local:
        report.box_area_fractions.append((x1 - x0) * (y1 - y0) / area)
        report.local_words.append(sum(len(s.split()) for s in sentences))
    if global_sentences is not None:
        report.global_words.append(sum(len(s.split()) for s in global_sentences))
        report.global_only += not local


def _spread(values: Sequence[float], digits: int = 0) -> str:
    """min, median, mean and max; the mean gets one more digit than the rest."""
    if not values:
        return "none"
    low, middle, mean, high = min(values), statistics.median(values), statistics.fmean(values), max(values)
    return f"min {low:.{digits}f}, median {middle:.{digits}f}, mean {mean:.{digits + 1}f}, max {high:.{digits}f}"


def report_lines(report: DatasetReport, root: str | Path) -> list[str]:
    """The printed report of :func:`check_dataset`."""
    lines = [f"{root}: {report.shard_pairs} shard pair(s), {report.pairs} image/record pair(s) read, "
             f"{report.usable} usable"]
    if report.usable:
        lines += [
            f"image width:         {_spread([w for w, _ in report.sizes])}",
            f"image height:        {_spread([h for _, h in report.sizes])}",
            f"boxes per image:     {_spread(report.boxes_per_image)} ({sum(report.boxes_per_image)} in all; "
            f"{report.global_only} image(s) with a global caption only)",
            f"box area / image:    {_spread(report.box_area_fractions, 3)}",
            f"local caption words: {_spread(report.local_words)}",
            f"global caption words: {_spread(report.global_words)} ({len(report.global_words)} image(s) with one)",
        ]
    if not report.skips:
        lines.append("skipped: nothing")
    for reason, count in sorted(report.skips.items(), key=lambda item: (-item[1], item[0])):
        lines.append(f"skipped {count:>8} {reason}: {SKIP_REASONS.get(reason, '')}")
        lines += [f"         e.g. {example}" for example in report.examples.get(reason, [])]
    if not report.usable:
        lines.append("nothing usable: the trainer would find no sample to train on")
    return lines


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", help="a dataset folder with images/ and text_boxes/ shards")


def run_from_args(args: argparse.Namespace) -> int:
    report = check_dataset(args.dir)
    print("\n".join(report_lines(report, args.dir)))
    return 0 if report.usable else 1
