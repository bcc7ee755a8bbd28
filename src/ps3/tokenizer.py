"""Text → token ids for the PS3 text tower (design §4), with the ``tokenizers`` library only.

This reproduces what open_clip's ``HFTokenizer`` does for the SigLIP/SigLIP2 towers PS3 is built
on: clean the text (``canonicalize`` / ``lower`` / ``whitespace``), encode it with the Hugging Face
fast tokenizer named by ``tokenizer_name`` *with* its special tokens (its post-processor, e.g.
SigLIP2's Gemma tokenizer appends ``<eos>``), truncate to ``context_length`` keeping those special
tokens, and pad on the right with the repo's pad token.

A PS3 repo's ``tokenizer_config.json`` reads
``{"tokenizer_name": "timm/ViT-SO400M-14-SigLIP2-378", "context_length": 64, "clean": "canonicalize"}``;
the ``tokenizer.json`` comes from the directory itself when present, else from that hub repo.
"""
from __future__ import annotations

import html
import json
import os
import string
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
from tokenizers import Tokenizer

try:  # ftfy repairs mojibake ("cafÃ©" → "café"); optional, as it only matters for broken input
    import ftfy
except ImportError:  # pragma: no cover - exercised only where ftfy is absent
    ftfy = None

TOKENIZER_CONFIG_NAME = "tokenizer_config.json"
TOKENIZER_FILE_NAME = "tokenizer.json"
SPECIAL_TOKENS_MAP_NAME = "special_tokens_map.json"
CLEAN_MODES = ("canonicalize", "lower", "whitespace", "none")
_PUNCTUATION_TABLE = str.maketrans("", "", string.punctuation)
_warned_no_ftfy = False


def basic_clean(text: str) -> str:
    """Fix mojibake (when ftfy is installed), unescape HTML twice (``&amp;amp;`` → ``&``), strip."""
    global _warned_no_ftfy
    if ftfy is not None:
        text = ftfy.fix_text(text)
    elif not _warned_no_ftfy:
        _warned_no_ftfy = True
        warnings.warn("ftfy is not installed: text is tokenized without mojibake repair, so broken "
                      "encodings may tokenize differently from upstream (pip install ftfy)", stacklevel=3)
    return html.unescape(html.unescape(text)).strip()


def collapse_whitespace(text: str) -> str:
    """Every run of (Unicode) whitespace becomes one space; ends stripped."""
    return " ".join(text.split())


def canonicalize_text(text: str) -> str:
    """big_vision's canonical form: ``_`` → space, ASCII punctuation dropped, lower case,
    whitespace collapsed."""
    text = text.replace("_", " ").translate(_PUNCTUATION_TABLE).lower()
    return collapse_whitespace(text)


def clean_text(text: str, mode: str) -> str:
    """Clean one text the way the tokenizer does before encoding.

    ``canonicalize``/``lower``/``whitespace`` first apply :func:`basic_clean`; ``none`` returns the
    text untouched.
    """
    if mode == "none":
        return text
    if mode == "canonicalize":
        return canonicalize_text(basic_clean(text))
    if mode == "lower":
        return collapse_whitespace(basic_clean(text)).lower()
    if mode == "whitespace":
        return collapse_whitespace(basic_clean(text))
    raise ValueError(f"clean must be one of {CLEAN_MODES}, got {mode!r}")


def _token_content(value: Any) -> str | None:
    """A special token as written by transformers: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"could not read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return data


def _is_hub_id(text: str) -> bool:
    return not text.startswith((".", "/", "~")) and text.count("/") == 1 and not Path(text).exists()


def _hub_file(repo_id: str, filename: str, hub_kwargs: dict[str, Any], required: bool) -> Path | None:
    """Download one file of a hub repo; ``None`` when the repo has no such file and it is optional."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import EntryNotFoundError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(repo_id, filename, **hub_kwargs))
    except LocalEntryNotFoundError as exc:  # offline or local_files_only, and not in the cache
        if not required:
            return None
        raise ValueError(f"{filename} of hub repo {repo_id!r} is not in the local cache and could not be "
                         "downloaded (offline or local_files_only=True)") from exc
    except EntryNotFoundError:
        if not required:
            return None
        raise ValueError(f"hub repo {repo_id!r} has no {filename} (a `tokenizers` file is needed; "
                         "convert a slow tokenizer once with transformers and save it)") from None
    except Exception as exc:  # network, auth, missing repo: one clear message for the caller
        raise ValueError(f"could not fetch {filename} from hub repo {repo_id!r} "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from exc


def _tokenizer_source(name: str, hub_kwargs: dict[str, Any]) -> tuple[Path, list[dict[str, Any]]]:
    """``tokenizer.json`` of ``name`` (a local directory or a hub id) plus the transformers
    configs beside it that say which token pads (``tokenizer_config.json``, ``special_tokens_map.json``)."""
    if name.startswith("hf-hub:"):  # open_clip's spelling of a hub id
        name = name[len("hf-hub:"):]
    local = Path(name).expanduser()
    if local.is_dir():
        files = {n: local / n for n in (TOKENIZER_FILE_NAME, TOKENIZER_CONFIG_NAME, SPECIAL_TOKENS_MAP_NAME)}
        if not files[TOKENIZER_FILE_NAME].is_file():
            raise ValueError(f"tokenizer directory {local} has no {TOKENIZER_FILE_NAME}")
        extras = [_read_json(files[n]) for n in (TOKENIZER_CONFIG_NAME, SPECIAL_TOKENS_MAP_NAME) if files[n].is_file()]
        return files[TOKENIZER_FILE_NAME], extras
    if not _is_hub_id(name):
        raise ValueError(f"tokenizer_name {name!r} is neither a local directory nor a hub id like "
                         "'timm/ViT-SO400M-14-SigLIP2-378'")
    tokenizer_file = _hub_file(name, TOKENIZER_FILE_NAME, hub_kwargs, required=True)
    extras = []
    for filename in (TOKENIZER_CONFIG_NAME, SPECIAL_TOKENS_MAP_NAME):
        path = _hub_file(name, filename, hub_kwargs, required=False)
        if path is not None:
            extras.append(_read_json(path))
    if tokenizer_file is None:  # required=True raises first; kept explicit for type checkers and -O
        raise ValueError(f"hub repo {name!r} has no {TOKENIZER_FILE_NAME}")
    return tokenizer_file, extras


def _locate_files(path_or_hub_id: str | os.PathLike, hub_kwargs: dict[str, Any]) -> tuple[Path, Path | None]:
    """(``tokenizer_config.json``, ``tokenizer.json`` beside it or None) of a directory or hub repo."""
    location = Path(path_or_hub_id).expanduser()
    text = str(path_or_hub_id)
    if location.is_dir():
        config_file: Path | None = location / TOKENIZER_CONFIG_NAME
        own_file: Path | None = location / TOKENIZER_FILE_NAME
        if not config_file.is_file():
            raise ValueError(f"no {TOKENIZER_CONFIG_NAME} in {location}: pass a directory written by "
                             "PS3Tokenizer.save_pretrained or a PS3 model repo")
        if not own_file.is_file():
            own_file = None
    elif location.exists():
        raise ValueError(f"{text} is a file: pass the directory that holds {TOKENIZER_CONFIG_NAME}")
    elif _is_hub_id(text):
        config_file = _hub_file(text, TOKENIZER_CONFIG_NAME, hub_kwargs, required=True)
        own_file = _hub_file(text, TOKENIZER_FILE_NAME, hub_kwargs, required=False)
    else:
        raise ValueError(f"{text!r} is neither an existing directory nor a hub id like 'nvidia/PS3-4K-SigLIP2'")
    if config_file is None:  # required=True raises first; kept explicit for type checkers and -O
        raise ValueError(f"{text!r} has no {TOKENIZER_CONFIG_NAME}")
    return config_file, own_file


def _vocabulary_files(config: dict[str, Any], config_file: Path, own_file: Path | None,
                      hub_kwargs: dict[str, Any]) -> tuple[Path, list[dict[str, Any]]]:
    """The ``tokenizer.json`` to load (``own_file``, else the one of the config's
    ``tokenizer_name``) and the configs that may say which token pads, ours first."""
    # Which token pads (and on which side) may be said by our config or, as transformers
    # writes it, by the configs beside the tokenizer.json; ours wins.
    sources = [config]
    if own_file is not None:
        special_map = config_file.parent / SPECIAL_TOKENS_MAP_NAME
        if special_map.is_file():
            sources.append(_read_json(special_map))
    else:
        name = config.get("tokenizer_name") or config.get("hf_tokenizer_name")
        if not isinstance(name, str) or not name:
            raise ValueError(f"{config_file} names no tokenizer_name and there is no {TOKENIZER_FILE_NAME} "
                             "beside it: nothing to load the vocabulary from")
        own_file, extras = _tokenizer_source(name, hub_kwargs)
        sources += extras
    return own_file, sources


class PS3Tokenizer:
    """Clean, encode, truncate and pad texts to a (B, context_length) LongTensor.

    ``tokenizer`` is a ``tokenizers.Tokenizer``; it is configured in place for truncation and
    padding (pass a copy to keep yours unchanged). Special tokens are whatever its post-processor
    adds. The pad token is ``pad_token`` if given, else ``pad_id``, else the tokenizer's own
    padding setting, else id 0.
    """

    def __init__(self, tokenizer: Tokenizer, context_length: int, clean: str = "whitespace", *,
                 tokenizer_name: str | None = None, pad_token: str | None = None, pad_id: int | None = None,
                 padding_side: str = "right", truncation_side: str = "right"):
        if not isinstance(tokenizer, Tokenizer):
            raise TypeError(f"tokenizer must be a tokenizers.Tokenizer, got {type(tokenizer).__name__}")
        if not isinstance(context_length, int) or isinstance(context_length, bool) or context_length <= 0:
            raise ValueError(f"context_length must be a positive integer, got {context_length!r}")
        if clean not in CLEAN_MODES:
            raise ValueError(f"clean must be one of {CLEAN_MODES}, got {clean!r}")
        for name, side in (("padding_side", padding_side), ("truncation_side", truncation_side)):
            if side not in ("right", "left"):
                raise ValueError(f"{name} must be 'right' or 'left', got {side!r}")
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.clean = clean
        self.tokenizer_name = tokenizer_name
        self.padding_side = padding_side
        self.truncation_side = truncation_side
        self.pad_token, self.pad_id = self._resolve_pad(tokenizer, pad_token, pad_id)
        # The backend truncates before its post-processor adds special tokens, so an appended
        # EOS survives truncation, as with transformers' truncation=True.
        tokenizer.enable_truncation(context_length, stride=0, strategy="longest_first", direction=truncation_side)
        tokenizer.enable_padding(direction=padding_side, pad_id=self.pad_id, pad_token=self.pad_token,
                                 length=context_length)

    @staticmethod
    def _resolve_pad(tokenizer: Tokenizer, pad_token: str | None, pad_id: int | None) -> tuple[str, int]:
        if pad_token is not None:
            found = tokenizer.token_to_id(pad_token)
            if found is None:
                raise ValueError(f"pad_token {pad_token!r} is not in the tokenizer's vocabulary")
            if pad_id is not None and pad_id != found:
                raise ValueError(f"pad_token {pad_token!r} has id {found}, but pad_id={pad_id} was given")
            return pad_token, found
        if pad_id is None:
            padding = tokenizer.padding
            pad_id = int(padding["pad_id"]) if padding else 0
        size = tokenizer.get_vocab_size(with_added_tokens=True)
        if not isinstance(pad_id, int) or not 0 <= pad_id < size:
            raise ValueError(f"pad_id must be an id in [0, {size}), got {pad_id!r}")
        return tokenizer.id_to_token(pad_id) or "", pad_id

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str | os.PathLike, *, context_length: int | None = None,
                        clean: str | None = None, revision: str | None = None,
                        cache_dir: str | os.PathLike | None = None, local_files_only: bool = False,
                        token: str | bool | None = None) -> "PS3Tokenizer":
        """Load from a directory or hub repo holding ``tokenizer_config.json``.

        ``tokenizer.json`` is read from the same place when it is there, else from the repo or
        directory named by the config's ``tokenizer_name``. ``context_length`` and ``clean``
        override the config. Only the tokenizer files are downloaded, never model weights.
        """
        if not isinstance(path_or_hub_id, (str, os.PathLike)):
            raise TypeError("path_or_hub_id must be a directory or a hub id string, got "
                            f"{type(path_or_hub_id).__name__}")
        hub_kwargs = dict(revision=revision, cache_dir=cache_dir, local_files_only=local_files_only, token=token)
        config_file, own_file = _locate_files(path_or_hub_id, hub_kwargs)
        config = _read_json(config_file)
        own_file, sources = _vocabulary_files(config, config_file, own_file, hub_kwargs)

        def first(key: str) -> Any:
            return next((s[key] for s in sources if s.get(key) is not None), None)

        if context_length is None:
            context_length = config.get("context_length")
            if context_length is None:
                raise ValueError(f"{config_file} has no context_length: pass context_length=")
        if clean is None:
            clean = config.get("clean") or (config.get("tokenizer_kwargs") or {}).get("clean") or "whitespace"
        try:
            backend = Tokenizer.from_file(str(own_file))
        except Exception as exc:
            raise ValueError(f"could not load {own_file} with the tokenizers library: {exc}") from exc
        # An explicit pad_id in our config without a pad_token means "pad with this id".
        pad_token = _token_content(config.get("pad_token"))
        pad_id = config.get("pad_id")
        if pad_token is None and pad_id is None:
            pad_token = _token_content(first("pad_token"))
        return cls(backend, context_length, clean,
                   tokenizer_name=config.get("tokenizer_name") or config.get("hf_tokenizer_name"),
                   pad_token=pad_token, pad_id=pad_id,
                   padding_side=first("padding_side") or "right", truncation_side=first("truncation_side") or "right")

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write ``tokenizer_config.json`` and ``tokenizer.json`` so ``from_pretrained`` reloads it
        without the hub."""
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        # Save the vocabulary without our padding/truncation settings: they live in the config.
        clean_copy = Tokenizer.from_str(self.tokenizer.to_str())
        clean_copy.no_padding()
        clean_copy.no_truncation()
        clean_copy.save(str(directory / TOKENIZER_FILE_NAME))
        config = {"tokenizer_name": self.tokenizer_name, "context_length": self.context_length, "clean": self.clean,
                  "pad_token": self.pad_token, "pad_id": self.pad_id, "padding_side": self.padding_side,
                  "truncation_side": self.truncation_side}
        (directory / TOKENIZER_CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        """Token ids (len(texts), context_length), dtype long: cleaned, with the tokenizer's special
        tokens, truncated and padded to ``context_length``."""
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, (list, tuple)):
            raise TypeError(f"texts must be a string or a list of strings, got {type(texts).__name__}")
        if len(texts) == 0:
            raise ValueError("texts is empty: pass at least one string")
        for i, item in enumerate(texts):
            if not isinstance(item, str):
                raise TypeError(f"texts[{i}] must be a str, got {type(item).__name__}")
        cleaned = [clean_text(t, self.clean) for t in texts]
        encodings = self.tokenizer.encode_batch(cleaned, add_special_tokens=True)
        return torch.tensor([e.ids for e in encodings], dtype=torch.long)

    def decode(self, token_ids: torch.Tensor | Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of one row of ids (padding and other special tokens skipped by default)."""
        if isinstance(token_ids, torch.Tensor):
            if token_ids.ndim != 1:
                raise ValueError(f"token_ids must be one row (1-D), got shape {tuple(token_ids.shape)}")
            token_ids = token_ids.tolist()
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def __repr__(self) -> str:
        return (f"PS3Tokenizer(tokenizer_name={self.tokenizer_name!r}, context_length={self.context_length}, "
                f"clean={self.clean!r}, vocab_size={self.vocab_size}, pad_token={self.pad_token!r})")
