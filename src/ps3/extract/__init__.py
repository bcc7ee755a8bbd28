"""Encode a whole dataset with PS3: ``ps3 extract`` and its Python API.

>>> from ps3.extract import extract, read
>>> summary = extract(["photos/"], "feats/", model="nvidia/PS3-4K-SigLIP2", tokens=1280)
>>> for sample in read("feats/"):
...     sample.key, sample.last_hidden_state.shape, sample.tokens_per_scale

Output (``DIR``): ``part-000000.tar``, … one sample per encoded input, keyed by the input's key
or relative path without extension: ``KEY.safetensors`` (``hidden_states`` (k, T, C),
``pooled_output``, ``tokens_per_scale``, ``selection_maps.{i}``, optionally ``feature_maps.{i}``;
see :mod:`ps3.extract.encode`) and ``KEY.json`` (``source``, ``width``, ``height``, ``tokens``,
``prompt``); a sidecar ``part-000000.json`` per shard; and ``index.json`` once the job is complete:
``samples`` (key → shard and token count), ``skipped`` (reason → keys), ``shards`` and a
``summary`` (images, tokens, skipped by reason, seconds). Modules: :mod:`~ps3.extract.inputs`
(INPUT → work units), :mod:`~ps3.extract.dataset` (decoding in DataLoader workers),
:mod:`~ps3.extract.encode` (the model call), :mod:`~ps3.extract.output` (shards, resume, index),
:mod:`~ps3.extract.run` (the loop, torchrun), :mod:`~ps3.extract.reader`.
"""
from .dataset import SKIP_REASONS
from .reader import ExtractedSample, load_index, read
from .run import extract

__all__ = ["SKIP_REASONS", "ExtractedSample", "extract", "load_index", "read"]
