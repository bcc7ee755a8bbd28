"""The ``ps3 data`` commands: ``synthetic``, ``from-coco``, ``from-vg``,
``from-flickr30k-entities``, ``from-jsonl``, ``check`` and ``show``.

Each command's module gives ``add_arguments(parser)`` and ``run_from_args(args)`` and is imported
only when the ``ps3`` parser is built (never by ``import ps3``): ``synthetic`` and ``check`` use
training code (:mod:`ps3.train.synthetic`, the trainer's sample path), the rest is core.
"""
from __future__ import annotations

import argparse
import importlib

__all__ = ["register", "register_data_commands"]

# (command, module, help, description)
_COMMANDS = [
    ("synthetic", "ps3.train.synthetic", "write a synthetic shapes dataset (images + text-box shards)",
     "Write scenes of coloured, textured shapes with one caption and box per shape, and a global caption, as "
     "paired webdataset shards."),
    ("from-coco", "ps3.data.convert_coco", "convert COCO instances (+ captions) into training shards",
     "Each object becomes a region (its category name and box); the image's captions become its global "
     "caption. Crowd annotations are dropped unless --keep-crowd."),
    ("from-vg", "ps3.data.convert_vg", "convert Visual Genome region descriptions into training shards",
     "Each region description becomes a region (its phrase and box). Visual Genome has no image captions."),
    ("from-flickr30k-entities", "ps3.data.convert_flickr30k",
     "convert Flickr30k Entities (phrases joined to boxes) into training shards",
     "Each marked phrase of the Sentences files becomes a region with its entity's box from the Annotations "
     "files (several boxes: the enclosing box); the five captions become the global caption."),
    ("from-jsonl", "ps3.data.convert_jsonl", "convert a JSON Lines file of grounded captions into training shards",
     'One object per line: {"image": path, "global_text": ..., "regions": [{"text": ..., "box": [x0, y0, x1, y1]}]}.'),
    ("check", "ps3.data.check", "read every sample as the trainer does; print counts and skip reasons",
     "Reads every image/text-box pair through the trainer's sample path and prints image sizes, boxes per "
     "image, caption lengths and every skip reason with examples. Exit code 1 when nothing is usable."),
    ("show", "ps3.data.show", "draw one sample's boxes and captions on its image (PNG)",
     "Writes the image of one sample with its boxes and captions drawn, and its global caption underneath."),
]


def _runner(module: str):
    def run(args: argparse.Namespace) -> int:
        return importlib.import_module(module).run_from_args(args)

    return run


def register(subparsers) -> None:
    """Add ``ps3 data`` and its commands to the ``ps3`` parser's sub-parsers."""
    data = subparsers.add_parser("data", help="make, check and show training data",
                                 description="Make, check and show pre-training data.")
    register_data_commands(data.add_subparsers(dest="data_command", metavar="DATA_COMMAND"))


def register_data_commands(data_sub) -> None:
    """Add every ``ps3 data`` command to the ``ps3 data`` sub-command parser."""
    for command, module, help_text, description in _COMMANDS:
        parser = data_sub.add_parser(command, help=help_text, description=description)
        importlib.import_module(module).add_arguments(parser)
        parser.set_defaults(func=_runner(module))
