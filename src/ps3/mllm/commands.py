"""``ps3 mllm train | chat | eval | toy-data``: PS3 inside a multimodal LLM from the command line.

transformers and peft (the ``mllm`` extra) are imported only when a command runs, so the
``ps3`` command table works without them.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..runtime import UserError, user_input

EXTRA_HINT = "pip install ps3[mllm]"


def _need_extra() -> None:
    for module in ("transformers", "peft"):
        try:
            __import__(module)
        except ImportError as exc:
            raise UserError(f"ps3 mllm needs {module}: {EXTRA_HINT}") from exc
    from transformers.utils import logging

    logging.disable_progress_bar()  # the save/load bars of tiny models are noise in a log
    logging.set_verbosity_error()


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train the projector (align) or projector + prompt head + LLM (sft)",
                       description="Train PS3 inside an LLM on LLaVA-format conversations. align: projector only; "
                                   "sft: projector, top-down prompt head and the LLM (or LoRA adapters). "
                                   "Checkpoints also on Ctrl-C/SIGTERM; --resume continues exactly; works "
                                   "under torchrun (DDP, or FSDP with --fsdp).")
    p.add_argument("--vision", help="PS3 model directory or hub id (frozen)")
    p.add_argument("--llm", help="Hugging Face causal LM directory or id, or 'tiny' (random small Llama, "
                                 "tokenizer built from the training text)")
    p.add_argument("--init", help="start from an earlier run directory (e.g. sft after align)")
    p.add_argument("--data", required=True, help="LLaVA conversation JSON or JSONL")
    p.add_argument("--images", help="folder the records' image paths are relative to")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--stage", choices=("align", "sft"), default="align")
    p.add_argument("--steps", type=_positive, default=100)
    p.add_argument("--batch", type=_positive, default=8, help="records per step and process")
    p.add_argument("--lr", type=float, help="learning rate (default 1e-3 align, 2e-4 sft)")
    p.add_argument("--warmup", type=int, default=0, help="linear warmup steps before the cosine decay")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--lora", type=int, default=0, metavar="R", help="train LoRA adapters of rank R (sft)")
    p.add_argument("--fsdp", action="store_true",
                   help="under torchrun, shard the LLM across the processes with FSDP2 (one unit per decoder "
                        "layer; the encoder is replicated): for an LLM too large for one device")
    p.add_argument("--budgets", type=_positive, nargs="+", help="cells per high-res scale per look")
    p.add_argument("--looks", type=int, default=1, help="high-res looks per image")
    p.add_argument("--k", type=int, default=2, choices=(1, 2, 3), help="projector merge size (k x k cells)")
    p.add_argument("--selection-weight", type=float, default=1.0, help="weight of the box selection loss")
    p.add_argument("--cache-low-res", action="store_true",
                   help="keep each image's low-res pass (frozen encoder) for later epochs: faster, memory grows "
                        "by one pass per image (small encoders or datasets)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    p.add_argument("--save-every", type=_positive, default=50)
    p.add_argument("--log-every", type=_positive, default=10)
    p.add_argument("--keep", type=_positive, default=2, help="checkpoints kept")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_run_train)


def _run_train(args) -> int:
    _need_extra()
    from .trainer import train
    from .train_setup import MLLMTrainParams

    result = train(MLLMTrainParams.from_args(args))
    return {"SIGINT": 130, "SIGTERM": 143}.get(result.interrupted or "", 0)


def _add_chat(sub) -> None:
    p = sub.add_parser("chat", help="ask a trained run about an image (one question, or an interactive session)",
                       description="Answer QUESTION about IMAGE, or with no question start an interactive session "
                                   "(readline history; an empty line or Ctrl-D ends it). Follow-up questions look "
                                   "closer: a further high-res look steered by the question, encoding only "
                                   "patches not encoded yet.")
    p.add_argument("run", help="run directory of ps3 mllm train")
    p.add_argument("image")
    p.add_argument("question", nargs="?")
    p.add_argument("--no-look-closer", action="store_true", help="follow-up turns reuse the first look's tokens")
    p.add_argument("--max-new-tokens", type=_positive, default=32)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_run_chat)


def _print_answer(answer) -> None:
    look = f", {answer.new_cells} new high-res cells encoded" if answer.new_cells else ", no new look"
    print(answer.text)
    print(f"  [{answer.image_tokens} LLM image tokens{look}, {answer.seconds:.2f} s]", flush=True)


def _run_chat(args) -> int:
    _need_extra()
    from .chat import ChatSession
    from .topdown import TwoPassPS3

    if not Path(args.image).is_file():
        raise UserError(f"image not found: {args.image}")
    with user_input("RUN"):
        helper = TwoPassPS3.from_pretrained(args.run, device=args.device)
    with user_input("IMAGE"):
        session = ChatSession(helper, args.image, max_new_tokens=args.max_new_tokens,
                              look_closer=not args.no_look_closer)
    if args.question is not None:
        _print_answer(session.ask(args.question))
        return 0
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    while True:
        try:
            question = input("you> ").strip()
        except EOFError:
            print()
            return 0
        if not question:
            return 0
        _print_answer(session.ask(question))


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="score a trained run on LLaVA-format records (last answer of each)",
                       description="Exact and normalised match of each record's last answer, LLM image tokens and "
                                   "seconds per record, and selection recall of the boxes where present.")
    p.add_argument("run")
    p.add_argument("--data", required=True)
    p.add_argument("--images")
    p.add_argument("--json", help="write the summary and per-record results here")
    p.add_argument("--max-new-tokens", type=_positive, default=32)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_run_eval)


def _run_eval(args) -> int:
    _need_extra()
    from .conversations import load_conversations
    from .evaluate import evaluate
    from .topdown import TwoPassPS3

    with user_input("--data"):
        data = load_conversations(args.data, args.images)
    print(f"data: {data.summary()}", file=sys.stderr)
    with user_input("RUN"):
        helper = TwoPassPS3.from_pretrained(args.run, device=args.device)
    report = evaluate(helper, data.records, max_new_tokens=args.max_new_tokens)
    report["skipped"] = dict(data.skipped)
    recall = report["selection_recall"]
    print(f"records {report['records']}  exact {report['exact_match']:.3f}  normalised "
          f"{report['normalised_match']:.3f}  image tokens/record {report['image_tokens_per_record']:.1f}  "
          f"s/record {report['seconds_per_record']:.3f}  selection recall "
          f"{'n/a' if recall is None else f'{recall:.3f}'} ({report['records_with_boxes']} with boxes)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return 0


def _add_toy(sub) -> None:
    p = sub.add_parser("toy-data", help="write a small LLaVA-format dataset of synthetic shape scenes",
                       description="Scenes of coloured shapes with one question per scene (its answer the shape, "
                                   "its box on the question), every third with a follow-up turn.")
    p.add_argument("out")
    p.add_argument("--count", type=_positive, default=200)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_run_toy)


def _run_toy(args) -> int:
    from .toy_data import write_toy_data

    with user_input("--count"):
        path = write_toy_data(args.out, args.count, size=args.size, seed=args.seed)
    print(f"wrote {args.count} records to {path} (images in {Path(args.out) / 'images'})")
    return 0


def register(subparsers) -> None:
    """Add ``mllm`` with its sub-commands to a ``ps3`` sub-command parser."""
    mllm = subparsers.add_parser("mllm", help="PS3 inside an LLM: train, chat, eval, toy-data",
                                 description="Train, chat with and evaluate PS3 inside a Hugging Face causal LM.")
    sub = mllm.add_subparsers(dest="mllm_command", metavar="MLLM_COMMAND")
    for add in (_add_train, _add_chat, _add_eval, _add_toy):
        add(sub)
