"""``extract``: encode a whole dataset into feature shards, resumable and split across ranks.

Under ``torchrun`` (``WORLD_SIZE`` > 1) rank ``r`` takes the work units with ``index % world ==
r`` and writes their shards itself; rank 0 then waits for every shard of the job to appear and
merges their sidecars into ``index.json``. The only collective is one barrier at the start (so
``--overwrite`` has removed the old files before anyone writes); the wait at the end watches the
files, so ranks of unequal speed never run into a collective's timeout.
"""
from __future__ import annotations

import collections
import hashlib
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..runtime import UserError, parse_device, user_input
from .dataset import SKIP_REASONS, build_loader, default_workers
from .inputs import WorkUnit, plan_units, read_prompts
from .output import INDEX_NAME, UnitOutput, is_finished, remove_outputs, write_index

__all__ = ["extract"]

_POLL_SECONDS = 0.5


def _selection(looks: int | None, tokens: int | None, all_patches: bool) -> dict[str, Any]:
    """The model's selection arguments for ``looks`` / ``tokens`` / ``all_patches`` (default one look);
    the model checks the values themselves."""
    if (looks is not None) + (tokens is not None) + bool(all_patches) > 1:
        raise UserError("pass at most one of looks, tokens and all_patches (--looks/--tokens/--all)")
    if tokens is not None:
        return {"num_token_look_close": tokens}
    if all_patches:
        return {"num_look_close": "all"}
    return {"num_look_close": 1 if looks is None else looks}


def _check_counts(**values: Any) -> None:
    """Every value an int >= 1 (``workers`` >= 0); ``max_pixels`` and ``image_size`` may be None."""
    for name, value in values.items():
        if value is None and name in ("max_pixels", "image_size"):
            continue
        minimum = 0 if name == "workers" else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise UserError(f"{name} must be an int >= {minimum}, got {value!r}")


def _prepare_directory(directory: Path, rank: int, world: int, overwrite: bool) -> None:
    """Rank 0 creates ``directory``, empties it with ``overwrite``, and drops a stale index (it is
    rewritten once the job is complete); every rank waits for that before looking at shards."""
    if rank == 0:
        directory.mkdir(parents=True, exist_ok=True)
        if overwrite:
            remove_outputs(directory)
        else:
            (directory / INDEX_NAME).unlink(missing_ok=True)
    if world > 1:
        torch.distributed.barrier()


def _distributed() -> tuple[int, int, bool]:
    """(rank, world size, whether this call created the process group)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, False
    import torch.distributed as dist

    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    dist.init_process_group("gloo")  # coordination only: one barrier, on any device
    return dist.get_rank(), dist.get_world_size(), True


def _device(device: str | torch.device) -> torch.device:
    with user_input("device"):
        device = parse_device(device)
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))  # one GPU per torchrun process
        if device.index >= torch.cuda.device_count():
            raise UserError(f"torchrun local rank {device.index} has no GPU: this machine has "
                            f"{torch.cuda.device_count()}; start at most that many processes per node")
    return device


def _wait_for_shards(directory: Path, units: list[WorkUnit]) -> None:
    waiting = [u for u in units if not (directory / f"{u.name}.tar").is_file()]
    while waiting:
        time.sleep(_POLL_SECONDS)
        waiting = [u for u in waiting if not (directory / f"{u.name}.tar").is_file()]


def extract(inputs: str | os.PathLike | Sequence[str | os.PathLike], out: str | os.PathLike, *, model: str,
            looks: int | None = None, tokens: int | None = None, all_patches: bool = False,
            prompt: str | None = None, prompts: str | os.PathLike | None = None, layers: int = 1,
            dtype: str = "float32", device: str | torch.device = "cpu", batch_size: int = 8,
            workers: int | None = None, feature_maps: bool = False, strict: bool = False, overwrite: bool = False,
            max_pixels: int | None = None, shard_size: int = 1000, image_size: int | None = None,
            progress: bool = True) -> dict[str, Any]:
    """Encode every image of ``inputs`` with the PS3 model ``model`` into shards under ``out``.

    ``inputs``: directories of images, list files, images or image webdataset shards (see
    :mod:`ps3.extract.inputs`). Selection as in ``ps3 encode``: ``looks`` (default 1),
    ``tokens`` or ``all_patches``; ``prompt`` steers every image, ``prompts`` (a JSON-lines file
    of ``{"key", "prompt"}``) steers the images it names. ``layers``: how many last layers to
    keep. Returns the summary of ``index.json`` (on ranks other than 0 under torchrun: the
    counts of that rank's shards, with ``"partial": True``). See :mod:`ps3.extract` for the
    output format.
    """
    start, started_at = time.perf_counter(), time.time()
    selection = _selection(looks, tokens, all_patches)
    workers = default_workers() if workers is None else workers
    _check_counts(layers=layers, batch_size=batch_size, shard_size=shard_size, workers=workers,
                  max_pixels=max_pixels, image_size=image_size)
    by_key = read_prompts(prompts) if prompts is not None else {}
    units = plan_units(inputs, shard_size)
    device = _device(device)
    # What the shards depend on; a rerun must match it to keep them (a local model by absolute path).
    model_name = os.path.abspath(model) if os.path.isdir(model) else os.fspath(model)
    settings = {"model": model_name, "selection": selection, "layers": layers, "dtype": str(dtype),
                "feature_maps": bool(feature_maps), "image_size": image_size, "prompt": prompt,
                "prompts": hashlib.sha256(Path(prompts).read_bytes()).hexdigest()[:16] if prompts else None,
                "max_pixels": max_pixels}
    directory = Path(out)
    rank, world, created_group = _distributed()
    try:
        _prepare_directory(directory, rank, world, overwrite)
        mine = [u for u in units if u.index % world == rank]
        pending = [u for u in mine if not is_finished(directory, u, settings)]
        local = {"images": 0, "tokens": 0, "skipped": {}}
        if pending:
            from .encode import FeatureEncoder

            encoder = FeatureEncoder(model, device=device, dtype=dtype, selection=selection, layers=layers,
                                     feature_maps=feature_maps, image_size=image_size,
                                     use_prompts=prompt is not None or bool(by_key))
            loop = _Loop(directory, settings, rank, encoder, strict, prompt, by_key, max(1, workers), local)
            loop.run(pending, batch_size=batch_size, workers=workers, max_pixels=max_pixels,
                     progress=progress and rank == 0)
        if rank != 0:
            return {**local, "partial": True, "rank": rank}
        _wait_for_shards(directory, units)
        return write_index(directory, units, settings, time.perf_counter() - start, started_at)
    finally:
        if created_group:
            torch.distributed.destroy_process_group()


class _Writes:
    """Serialising and writing run on one background thread, in submission order, while the model
    computes the next batch; at most ``depth`` batches wait, so memory stays bounded."""

    def __init__(self, depth: int = 2) -> None:
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="ps3-extract-writer")
        self.depth = depth
        self.pending: collections.deque[Future] = collections.deque()

    def submit(self, fn: Callable[..., None], *args: Any) -> None:
        self.pending.append(self.pool.submit(fn, *args))
        while len(self.pending) > self.depth:
            self.pending.popleft().result()  # re-raises a failed write

    def drain(self, raise_errors: bool = True) -> None:
        while self.pending:
            future = self.pending.popleft()
            try:
                future.result()
            except BaseException:
                if raise_errors:
                    raise

    def close(self) -> None:
        self.pool.shutdown(wait=True)


def _write_batch(output: UnitOutput, encoded: list, infos: list[dict[str, Any]]) -> None:
    for (key, tensors, tokens), info in zip(encoded, infos):
        output.add(key, tensors, tokens, info)


class _Loop:
    """Feeds the loader's messages to the encoder, and its results to the open shards."""

    def __init__(self, directory: Path, settings: dict[str, Any], rank: int, encoder, strict: bool,
                 prompt: str | None, by_key: dict[str, str], workers: int, local: dict[str, Any]) -> None:
        self.directory, self.settings, self.rank, self.encoder = directory, settings, rank, encoder
        self.strict, self.prompt, self.by_key, self.workers, self.local = strict, prompt, by_key, workers, local
        self.open: dict[int, tuple[UnitOutput, float]] = {}
        self.writes = _Writes()

    def run(self, pending: list[WorkUnit], *, batch_size: int, workers: int, max_pixels: int | None,
            progress: bool) -> None:
        from tqdm import tqdm

        units = {u.index: u for u in pending}
        self.known = sum(u.known_size or 0 for u in pending)
        self.shards_pending, self.shard_items = sum(u.shard is not None for u in pending), []
        total = None if self.shards_pending else self.known
        loader = build_loader(pending, processor=self.encoder.processor, image_size=self.encoder.image_size,
                              batch_size=batch_size, workers=workers, max_pixels=max_pixels,
                              pin_memory=self.encoder.device.type == "cuda")
        bar = tqdm(total=total, unit="img", desc="extract", disable=not progress, smoothing=0.1)
        try:
            for message in loader:
                self._handle(message, units[message["unit"]], bar)
            self.writes.drain()
        except BaseException:
            self.writes.drain(raise_errors=False)  # let the writer stop touching the shards first
            for output, _ in self.open.values():
                output.abort()
            raise
        finally:
            self.writes.close()
            bar.close()

    def _output(self, unit: WorkUnit) -> UnitOutput:
        if unit.index not in self.open:
            output = UnitOutput(self.directory, unit, self.settings, self.rank)
            output.pending_workers = self.workers
            self.open[unit.index] = (output, time.perf_counter())
        return self.open[unit.index][0]

    def _handle(self, message: dict[str, Any], unit: WorkUnit, bar) -> None:
        output = self._output(unit)
        kind = message["kind"]
        if kind == "batch":
            output.received += len(message["keys"])
        if kind == "skip":
            key, reason, detail = message["key"], message["reason"], message["detail"]
            if self.strict:
                raise UserError(f"bad input ({reason}: {SKIP_REASONS[reason]}) {key!r}: {detail}")
            output.skip(key, reason, detail)
            self.local["skipped"][reason] = self.local["skipped"].get(reason, 0) + 1
            bar.update(1)
        elif kind == "batch":
            keys = message["keys"]
            texts = [self.by_key.get(k, self.prompt) for k in keys]
            encoded = self.encoder.encode(message, texts)
            infos = [{"source": source, "width": width, "height": height}
                     for source, (width, height) in zip(message["sources"], message["sizes"])]
            for info, text in zip(infos, texts):
                if text is not None:
                    info["prompt"] = text
            self.writes.submit(_write_batch, output, encoded, infos)
            self.local["tokens"] += sum(tokens for _key, _tensors, tokens in encoded)
            self.local["images"] += len(keys)
            bar.update(len(keys))
        else:
            output.pending_workers -= 1
            if output.pending_workers == 0:
                _, started = self.open.pop(unit.index)
                self.writes.submit(output.finish, time.perf_counter() - started)
                if unit.shard is not None:  # the writer may still be adding samples: count the inputs
                    self._estimate_total(bar, output.received + len(output.skipped))

    def _estimate_total(self, bar, items: int) -> None:
        """Input shards are counted only as they are read: after each one, the progress bar's
        total (and so its ETA) assumes the others hold as many images on average."""
        self.shard_items.append(items)
        bar.total = self.known + round(sum(self.shard_items) / len(self.shard_items) * self.shards_pending)
        bar.refresh()
