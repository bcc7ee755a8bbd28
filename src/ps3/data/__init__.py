"""Pre-training data on disk (design §5): webdataset tar shards of images and text-box records.

* :mod:`ps3.data.shards` — listing shards, the one tar reader (damage reported, never raised),
  lockstep pairing of an image shard with its text-box shard, skip counts;
* :mod:`ps3.data.writer` — atomic, byte-reproducible shard writing and the paired
  ``images/`` + ``text_boxes/`` layout;
* :mod:`ps3.data.boxes` — clipping boxes to the image and their ground-truth maps.

This package is part of the core: it never imports :mod:`ps3.train`.
"""
from .boxes import box_cells, box_to_gt_map, clip_box
from .shards import (
    IMAGE_EXTENSIONS,
    SKIP_REASONS,
    ShardPair,
    SkipCounter,
    SkipReporter,
    iter_paired_shard,
    iter_shard,
    list_shard_pairs,
    list_shards,
)
from .writer import PairedShardWriter, ShardWriter, encode_record, write_paired_shards

__all__ = [
    "IMAGE_EXTENSIONS",
    "SKIP_REASONS",
    "ShardPair",
    "SkipCounter",
    "SkipReporter",
    "iter_paired_shard",
    "iter_shard",
    "list_shard_pairs",
    "list_shards",
    "PairedShardWriter",
    "ShardWriter",
    "encode_record",
    "write_paired_shards",
    "box_cells",
    "box_to_gt_map",
    "clip_box",
]
