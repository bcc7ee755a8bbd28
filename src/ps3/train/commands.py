"""Command-line wiring of pre-training: ``ps3 train`` and ``ps3 export`` (also
``python -m ps3.train``, which takes the ``ps3 train`` flags).

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


def add_train_parser(parser: argparse.ArgumentParser) -> None:
    from .params import add_arguments

    add_arguments(parser)
    parser.set_defaults(func=_run_train)


def register(subparsers) -> None:
    """Add ``train`` and ``export`` to a ``ps3`` sub-command parser."""
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


def main_train(argv: list[str] | None = None) -> int:
    """``python -m ps3.train``: the ``ps3 train`` flags; a user mistake ends with one line and exit
    code 2, an internal bug with its traceback (:func:`ps3.runtime.run_command`)."""
    from ..runtime import run_command

    parser = argparse.ArgumentParser(prog="python -m ps3.train", description="Pre-train PS3.")
    add_train_parser(parser)
    args = parser.parse_args(argv)
    return run_command(args.func, args, prog="ps3 train")
