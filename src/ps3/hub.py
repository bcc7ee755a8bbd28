"""Where weights come from and go to: local directories or the Hugging Face hub, safetensors only.

``from_pretrained`` / ``save_pretrained`` on every model go through here. A hub id is downloaded
with ``huggingface_hub.snapshot_download`` and then read exactly like a local directory.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
_PICKLE_NAMES = ("pytorch_model.bin", "model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth")
# What a model directory needs; tokenizer files ride along so a joint repo gives everything.
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model"]


def resolve_model_dir(path_or_hub_id: str | os.PathLike, revision: str | None = None,
                      cache_dir: str | os.PathLike | None = None, local_files_only: bool = False,
                      token: str | bool | None = None) -> Path:
    """A local directory as is; otherwise a hub repo id downloaded to the cache."""
    if not isinstance(path_or_hub_id, (str, os.PathLike)):
        raise TypeError("path_or_hub_id must be a directory path or a hub id string, got "
                        f"{type(path_or_hub_id).__name__}")
    path = Path(path_or_hub_id).expanduser()
    if path.is_dir():
        return path
    text = str(path_or_hub_id)
    if path.exists():
        raise ValueError(f"{text} is a file: pass the directory that holds config.json and model.safetensors")
    if text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise ValueError(f"{text!r} is neither an existing directory nor a hub id like 'nvidia/PS3-4K-SigLIP2'")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(text, revision=revision, cache_dir=cache_dir, allow_patterns=_HUB_PATTERNS,
                                      local_files_only=local_files_only, token=token))
    except Exception as exc:  # network, auth, missing repo: one clear message for the caller
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0]}" if str(exc) else type(exc).__name__
    # Raised outside the handler: the hub client's chained traceback says no more than `reason`.
    raise ValueError(f"{text!r} is not a local directory and could not be fetched from the Hugging Face hub "
                     f"({reason}); pass a local model directory instead (e.g. one written by "
                     "`ps3 init random-4k DIR` or `make demo`)")


def load_state_dict(directory: str | os.PathLike, prefixes: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """Read ``model.safetensors`` or a sharded set listed in ``model.safetensors.index.json``.

    With ``prefixes``, only keys starting with one of them are read (shards without such keys are
    skipped). Pickled weights are refused: they can run arbitrary code when loaded.
    """
    directory = Path(directory)
    keep = tuple(prefixes) if prefixes is not None else None
    single, index = directory / WEIGHTS_NAME, directory / WEIGHTS_INDEX_NAME
    if single.is_file():
        files = [single]
    elif index.is_file():
        files = sorted({directory / f for k, f in _weight_map(index).items() if keep is None or k.startswith(keep)})
    else:
        pickled = [n for n in _PICKLE_NAMES if (directory / n).exists()]
        if pickled:
            raise ValueError(
                f"{directory} holds only pickled weights ({pickled[0]}); ps3 reads safetensors only. "
                "Convert once with: "
                "python -c \"import torch; from safetensors.torch import save_file; "
                f"sd = torch.load('{directory / pickled[0]}', weights_only=True); "
                f"save_file({{k: v.contiguous() for k, v in sd.items()}}, '{single}')\"")
        raise ValueError(f"no {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME} in {directory}")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        for key, value in _read_weights(file).items():
            if keep is None or key.startswith(keep):
                state[key] = value
    return state


def _redownload_hint(file: Path) -> str:
    real = file.resolve()  # a hub cache links snapshot files to blobs: the blob is what to delete
    return f"delete {real} and download it again"


def _read_weights(file: Path) -> dict[str, torch.Tensor]:
    """One safetensors file; a truncated or foreign file is a ValueError that says what to do."""
    if not file.is_file():
        raise ValueError(f"weights file {file} (listed in {WEIGHTS_INDEX_NAME}) is missing: the download is "
                         "incomplete; download the model again")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{file} is not a readable safetensors file ({exc}): the download was truncated or the "
                         f"file is not model weights; {_redownload_hint(file)}") from exc


def _weight_map(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError, OSError) as exc:
        raise ValueError(f"{index} is not a safetensors index (a JSON object with a 'weight_map'): "
                         f"{type(exc).__name__}: {exc}; {_redownload_hint(index)}") from exc
    if not isinstance(weight_map, dict):
        raise ValueError(f"{index}: 'weight_map' must map tensor names to file names; {_redownload_hint(index)}")
    return weight_map


def save_state_dict(state: dict[str, torch.Tensor], directory: str | os.PathLike,
                    max_shard_bytes: int | None = None, metadata: dict[str, str] | None = None) -> None:
    """Write ``model.safetensors`` (or shards plus an index when larger than ``max_shard_bytes``).

    Files are written to a temporary name and renamed, so an interrupted save never leaves a
    truncated weights file under the real name.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    metadata = {"format": "pt", **(metadata or {})}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, value in state.items():
        nbytes = value.numel() * value.element_size()
        if max_shard_bytes is not None and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = value
        size += nbytes
    if len(shards) == 1:
        _atomic_save(shards[0], directory / WEIGHTS_NAME, metadata)
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        _atomic_save(shard, directory / name, metadata)
        weight_map.update({k: name for k in shard})
    total = sum(v.numel() * v.element_size() for v in state.values())
    tmp = directory / (WEIGHTS_INDEX_NAME + ".tmp")
    tmp.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    os.replace(tmp, directory / WEIGHTS_INDEX_NAME)


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def check_and_load(module: torch.nn.Module, state: dict[str, torch.Tensor], where: str = "checkpoint") -> None:
    """Load ``state`` into ``module`` strictly; a mismatch raises ValueError naming the first keys."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
             for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            parts.append(f"{len(wrong)} shape mismatches (first: {'; '.join(wrong[:5])})")
        if missing:
            parts.append(f"{len(missing)} missing keys (first: {', '.join(missing[:5])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (first: {', '.join(unexpected[:5])})")
        raise ValueError(f"the {where} does not fit the model config: " + "; ".join(parts))
    module.load_state_dict(state, strict=True, assign=any(p.is_meta for p in module.parameters()))


class PretrainedMixin:
    """``from_pretrained`` / ``save_pretrained`` for a module whose state-dict keys already carry
    their published prefix (``vision_model.``, ``text_model.``) because of how it is nested."""

    config_class: type
    # Only state keys under these prefixes are read from a (possibly joint) checkpoint.
    checkpoint_prefixes: tuple[str, ...] = ()

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str | os.PathLike, *, config: Any = None, revision: str | None = None,
                        cache_dir: str | os.PathLike | None = None, local_files_only: bool = False,
                        token: str | bool | None = None, dtype: Any = None,
                        device: str | torch.device | None = None, torch_dtype: Any = None, **model_kwargs: Any):
        """Load a model directory or hub repo. ``dtype`` (or Hugging Face's spelling ``torch_dtype``;
        ``"auto"`` keeps the stored precision, as does None) and ``device`` convert after loading."""
        if dtype is not None and torch_dtype is not None and dtype != torch_dtype:
            raise ValueError(f"dtype={dtype!r} and torch_dtype={torch_dtype!r} disagree: pass only one of them")
        dtype = dtype if dtype is not None else torch_dtype
        from .runtime import parse_device, parse_dtype  # (runtime imports this module)

        # Loading keeps the stored precision unless asked; both are checked before anything is read.
        dtype = None if dtype is None or dtype == "auto" else parse_dtype(dtype)
        device = None if device is None else parse_device(device)
        directory = resolve_model_dir(path_or_hub_id, revision=revision, cache_dir=cache_dir,
                                      local_files_only=local_files_only, token=token)
        if config is None:
            config = cls.config_class.from_pretrained(directory)
        with torch.device("meta"):
            model = cls(config, **model_kwargs)
        state = load_state_dict(directory, cls.checkpoint_prefixes or None)
        for key, value in cls._optional_tensors().items():
            state.setdefault(key, value)
        check_and_load(model, state, where=f"checkpoint in {directory}")
        model._init_non_persistent()
        if dtype is not None or device is not None:
            model.to(device=device, dtype=dtype)
        return model.eval()

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the first floating-point parameter (as Hugging Face models report it)."""
        first = next((p for p in self.parameters() if p.is_floating_point()), None)
        return first.dtype if first is not None else torch.get_default_dtype()

    @property
    def device(self) -> torch.device:
        """The device of the first parameter."""
        first = next(self.parameters(), None)
        return first.device if first is not None else torch.device("cpu")

    @classmethod
    def _optional_tensors(cls) -> dict[str, torch.Tensor]:
        """Tensors a checkpoint may lack, with the values to use then."""
        return {}

    def _init_non_persistent(self) -> None:
        """Rebuild buffers that are not saved (they were created on the meta device)."""

    def save_pretrained(self, save_directory: str | os.PathLike, max_shard_bytes: int | None = None) -> None:
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.config.save_pretrained(directory)
        save_state_dict(self.state_dict(), directory, max_shard_bytes=max_shard_bytes)
