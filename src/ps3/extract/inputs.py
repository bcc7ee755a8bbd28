"""What to encode: the INPUT arguments of ``ps3 extract`` → numbered work units.

An INPUT is one of

* a **directory tree of images** (every file with an image extension, walked in sorted order;
  hidden files skipped): keys are the paths relative to the directory, without the extension;
* a **text file listing image paths** (one per line; blank lines and ``#`` comments skipped;
  relative paths are read from the list file's directory): keys are the paths relative to the
  deepest directory that holds them all, without the extension;
* an **image file** (keys as for a list of the image files given on the command line);
* **image webdataset shards**: a ``.tar`` file, a directory holding ``*.tar`` files, a brace
  pattern such as ``data/image_{00000..00099}.tar`` or a URL: keys are the samples' keys.

Each unit becomes one output shard ``part-{index:06d}.tar``: the image files are cut into units
of ``shard_size`` images, and every input shard is a unit of its own (its samples are only known
once it is read). Units are numbered the same way on every run and on every rank, which is what
makes resume and the split between torchrun ranks work.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..runtime import UserError

__all__ = ["IMAGE_SUFFIXES", "WorkUnit", "plan_units", "read_prompts"]

#: File suffixes taken as images when walking a directory tree or given as an INPUT.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})


@dataclass(frozen=True)
class WorkUnit:
    """One output shard's worth of input: image files (``files``: (key, path) pairs) or one input
    shard (``shard``: its path or URL)."""

    index: int
    files: tuple[tuple[str, str], ...] = ()
    shard: str | None = None

    @property
    def name(self) -> str:
        return f"part-{self.index:06d}"

    @property
    def known_size(self) -> int | None:
        """How many images the unit holds, when known before reading it."""
        return None if self.shard is not None else len(self.files)

    def fingerprint(self) -> str:
        """Identifies the unit's input, so a resumed run can tell that a finished shard is its own."""
        digest = hashlib.sha256()
        if self.shard is not None:
            digest.update(b"shard\0" + self.shard.encode())
        for key, path in self.files:
            digest.update(f"{key}\0{path}\0".encode())
        return digest.hexdigest()[:16]


def _key_of(relative: str) -> str:
    """A relative path → a webdataset key: no extension, POSIX separators, and no '.' in the last
    component (webdataset splits a member name at the first dot after the last '/')."""
    stem, _, name = Path(relative).with_suffix("").as_posix().rpartition("/")
    name = name.replace(".", "_")
    return f"{stem}/{name}" if stem else name


def _walk_images(root: str) -> list[tuple[str, str]]:
    items = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES:
                path = os.path.join(directory, name)
                items.append((_key_of(os.path.relpath(path, root)), path))
    if not items:
        raise UserError(f"INPUT {root}: the directory holds no images (nor *.tar shards); image files end in "
                         f"{', '.join(sorted(IMAGE_SUFFIXES))}")
    return items


def _keyed_paths(paths: Sequence[str]) -> list[tuple[str, str]]:
    """Paths → (key, path), keys relative to the deepest directory holding every path."""
    absolute = [os.path.abspath(p) for p in paths]
    common = os.path.commonpath([os.path.dirname(p) for p in absolute])
    return [(_key_of(os.path.relpath(a, common)), p) for a, p in zip(absolute, paths)]


def _read_list(list_file: str) -> list[str]:
    base = os.path.dirname(os.path.abspath(list_file))
    try:
        lines = Path(list_file).read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise UserError(f"INPUT {list_file}: not a text file listing image paths (and not an image or a "
                         f".tar shard)") from exc
    paths = [os.path.join(base, line.strip()) for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not paths:
        raise UserError(f"INPUT {list_file}: the list file names no images")
    return paths


def _is_shard_spec(text: str) -> bool:
    return "{" in text or "::" in text or "://" in text or text.startswith("pipe:")


def _list_shards(spec: str) -> list[str]:
    from ..data.shards import list_shards

    try:
        return list_shards(spec, argument=f"INPUT {spec}")
    except ValueError as exc:
        raise UserError(str(exc)) from exc


def _classify(inputs: Sequence[str]) -> tuple[list[list[tuple[str, str]]], list[str]]:
    """INPUTs → (groups of keyed image files, input shards)."""
    groups: list[list[tuple[str, str]]] = []
    loose: list[str] = []  # image files named on the command line: keyed together
    shards: list[str] = []
    for item in inputs:
        text = os.fspath(item)
        if os.path.isdir(text):
            if any(name.endswith(".tar") for name in os.listdir(text)):
                shards.extend(_list_shards(text))
            else:
                groups.append(_walk_images(text))
        elif os.path.isfile(text):
            suffix = Path(text).suffix.lower()
            if suffix == ".tar":
                shards.append(text)
            elif suffix in IMAGE_SUFFIXES:
                loose.append(text)
            else:
                groups.append(_keyed_paths(_read_list(text)))
        elif _is_shard_spec(text):
            shards.extend(_list_shards(text))
        else:
            raise UserError(f"INPUT {text}: no such file or directory (pass image directories, list files, "
                             f"images or .tar shards)")
    if loose:
        groups.insert(0, _keyed_paths(loose))
    return groups, shards


def plan_units(inputs: Sequence[str | os.PathLike], shard_size: int = 1000) -> list[WorkUnit]:
    """Number the inputs into work units (see the module docstring). Raises ``ValueError`` for an
    INPUT that does not exist or holds nothing, and when two image files would get the same key
    (as :class:`ps3.runtime.UserError`, a ``ValueError`` the command line prints as one line)."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    if not inputs:
        raise UserError("inputs is empty: pass image directories, list files, images or .tar shards")
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise UserError(f"shard_size must be a positive int, got {shard_size!r}")
    groups, shards = _classify([os.fspath(i) for i in inputs])
    files = [item for group in groups for item in group]
    seen: dict[str, str] = {}
    for key, path in files:
        if key in seen:
            raise UserError(f"two inputs get the key {key!r}: {seen[key]} and {path}; keys are paths without "
                             f"the extension, so rename one of them")
        seen[key] = path
    units = [WorkUnit(index=i, files=tuple(files[start:start + shard_size]))
             for i, start in enumerate(range(0, len(files), shard_size))]
    units += [WorkUnit(index=len(units) + i, shard=url) for i, url in enumerate(shards)]
    return units


def read_prompts(path: str | os.PathLike) -> dict[str, str]:
    """A JSON-lines file of ``{"key": ..., "prompt": ...}`` objects → key → prompt."""
    prompts: dict[str, str] = {}
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError as exc:
        raise UserError(f"--prompts file not found: {path}") from exc
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"--prompts {path} line {number}: not JSON ({exc.msg})") from exc
        if not isinstance(record, dict) or not isinstance(record.get("key"), str) \
                or not isinstance(record.get("prompt"), str):
            raise UserError(f"--prompts {path} line {number}: expected an object "
                             f'{{"key": "...", "prompt": "..."}} with string values')
        prompts[record["key"]] = record["prompt"]
    return prompts
