"""Command-line wiring of pre-training: ``ps3 train``, ``ps3 export`` and ``ps3 data synthetic``
(also ``python -m ps3.train``, which takes the ``ps3 train`` flags).

Modules that need the training extras (``webdataset``) are imported inside the run functions,
so :func:`register` never fails on an install without them.
"""
from __future__ import annotations

import argparse

__all__ = ["register", "main_train"]


def _run_train(args: argparse.Namespace) -> int:
    from .loop import run

    return run(args)


def _run_export(args: argparse.Namespace) -> int:
    from .export import export

    out = export(args.run_dir, args.out_dir, checkpoint=args.checkpoint)
    if not args.quiet:
        print(f"exported {out['checkpoint']} (step {out['step']}) to {args.out_dir}")
    return 0


def _run_synthetic(args: argparse.Namespace) -> int:
    from .synthetic import run_from_args

    return run_from_args(args)


def add_train_parser(parser: argparse.ArgumentParser) -> None:
    from .params import add_arguments

    add_arguments(parser)
    parser.set_defaults(func=_run_train)


def register(subparsers) -> None:
    """Add ``train``, ``export`` and ``data synthetic`` to a ``ps3`` sub-command parser."""
    train = subparsers.add_parser(
        "train", help="pre-train PS3 on paired image / text-box webdatasets (also under torchrun)",
        description="Pre-train PS3 (SigLIP loss + box supervision of the selection). Runs single-process or "
                    "under torchrun; --resume latest continues exactly where a stopped run left off.")
    add_train_parser(train)

    export = subparsers.add_parser(
        "export", help="write a training run's latest checkpoint as a published PS3 model directory",
        description="Write config.json, model.safetensors, preprocessor_config.json and the tokenizer files "
                    "from RUN_DIR's latest checkpoint, loadable with PS3Model/PS3VisionModel/PS3TextModel.")
    export.add_argument("run_dir", help="the --output-dir of a training run")
    export.add_argument("out_dir", help="directory to write the model into")
    export.add_argument("--checkpoint", help="export this checkpoint file instead of the latest")
    export.add_argument("--quiet", action="store_true", help="print nothing but errors")
    export.set_defaults(func=_run_export)

    data = subparsers.add_parser("data", help="make training data", description="Make training data.")
    data_sub = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND")
    synthetic = data_sub.add_parser(
        "synthetic", help="write a synthetic shapes dataset (images + text-box shards)",
        description="Write scenes of coloured, textured shapes with one caption and box per shape, and a "
                    "global caption, as paired webdataset shards.")
    from .synthetic import add_arguments as add_synthetic_arguments

    add_synthetic_arguments(synthetic)
    synthetic.set_defaults(func=_run_synthetic)
    from ..data.commands import register_data_commands

    register_data_commands(data_sub)  # from-coco, from-vg, from-flickr30k-entities, from-jsonl, check, show


def main_train(argv: list[str] | None = None) -> int:
    """``python -m ps3.train``: the ``ps3 train`` flags; a user mistake ends with one line and exit
    code 2, an internal bug with its traceback (:func:`ps3.runtime.run_command`)."""
    from ..runtime import run_command

    parser = argparse.ArgumentParser(prog="python -m ps3.train", description="Pre-train PS3.")
    add_train_parser(parser)
    args = parser.parse_args(argv)
    return run_command(args.func, args, prog="ps3 train")
