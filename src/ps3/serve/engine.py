"""The encoding the server does: a request's image and parameters → a :class:`Job`, and a list of
jobs → one mixed-batch encoder call.

Each job keeps its own image size, budget, prompt and (for a look-closer turn) the cells its
session already holds. The batch's low-res passes come from the cache (``ps3.serve.cache``) or
from one ``encode_low_res`` call over the images that miss it. A prompt-less (bottom-up) job in
a batch with prompted ones is scored against the model's learned prior prompt, which is what
bottom-up selection is (``ps3.selection_features.prior_and_prompt_probs``).
"""
from __future__ import annotations

import hashlib
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from ..images import load_image
from ..runtime import LoadedModel
from .cache import CachedImage, LowResCache, split_low_res, stack_low_res


class RequestError(ValueError):
    """A request the server refuses: ``status`` (400, 404, 413) and a message naming the field."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class Budget:
    """What a request asks to encode, as the encoder's arguments."""

    num_look_close: int | str | None = None
    num_token_look_close: int | str | None = None
    only_select_first_n_scale: int | None = None


@dataclass
class Job:
    key: tuple
    budget: Budget
    prompt: str | None
    pixels: torch.Tensor | None = None  # (3, H, W) uint8 when the image missed the cache
    image_size: tuple[int, int] | None = None
    cached: CachedImage | None = None
    old_maps: list[torch.Tensor] | None = None  # look-closer: (1, h_i, w_i) bool per high-res scale
    future: Future = field(default_factory=Future)


@dataclass
class JobResult:
    last_hidden_state: torch.Tensor  # (1, N, C) on the CPU
    selection_maps: list[torch.Tensor]  # (1, h_i, w_i) of the cells this call encoded
    image: CachedImage


def content_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Engine:
    """A loaded model, its low-res cache and the counters the metrics read."""

    def __init__(self, loaded: LoadedModel, model_name: str, cache: LowResCache, max_pixels: int):
        self.loaded = loaded
        self.model_name = model_name
        self.cache = cache
        self.max_pixels = max_pixels
        self.vision = loaded.vision.vision_model
        self.dtype_name = str(loaded.dtype).replace("torch.", "")
        self.step = sum(self.vision.max_select_num_each_scale)
        self.low_res_images = 0  # images whose low-res pass this server ran
        self.tokens_encoded = 0
        self._counter_lock = threading.Lock()

    @property
    def has_text(self) -> bool:
        return self.loaded.text is not None

    def key(self, digest: str) -> tuple:
        return (digest, self.model_name, self.dtype_name)

    # ------------------------------------------------------------------ request side
    def decode(self, data: bytes) -> tuple[torch.Tensor, tuple[int, int]]:
        """An uploaded file → resized (3, H, W) uint8 pixels and its (height, width); RequestError
        413 over the pixel limit, 400 for anything that is not a decodable image."""
        try:
            image = load_image(data, max_pixels=self.max_pixels, name="image")
        except (ValueError, TypeError) as exc:
            status = 413 if "decompression bomb" in str(exc) else 400
            raise RequestError(status, f"image: {str(exc).splitlines()[0]}") from exc
        except Exception as exc:  # a decoder failure PIL does not wrap (a malformed file)
            raise RequestError(400, f"image: cannot decode the file ({type(exc).__name__}): send a JPEG, PNG, "
                                    "WebP or TIFF image") from exc
        size = (image.height, image.width)
        h, w = self.loaded.processor.output_size(*size)
        if (h, w) != size:
            image = image.resize((w, h), Image.Resampling.BICUBIC)  # as PS3ImageProcessor resizes
        return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1), size

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (3, H, W) → the model's input, with the processor's exact arithmetic."""
        processor = self.loaded.processor
        x = pixels.float().div_(255)
        x = x.sub_(torch.tensor(processor.mean).view(3, 1, 1)).div_(torch.tensor(processor.std).view(3, 1, 1))
        return x.to(self.loaded.device, self.loaded.dtype)

    # ------------------------------------------------------------------ checks before queueing
    def canonical(self, budget: Budget, size: tuple[int, int]) -> Budget:
        """The same budget, spelled so that most requests share one call signature: the encoder
        takes a per-image list for each argument but no list mixing None with values.
        ``num_look_close=k`` alone equals ``k`` with a token count above one look's budget (that
        count then shrinks nothing), and a token count within one look equals one look of that
        many tokens (``ps3.encoder.selection``'s look count)."""
        looks, tokens = budget.num_look_close, budget.num_token_look_close
        above = self.step + 1
        if looks is None and tokens is None:
            looks = 1  # the default of `ps3 encode`
        if tokens is None:
            tokens = above
        elif looks is None:
            if tokens == "all":
                looks, tokens = "all", above
            else:
                covered = budget.only_select_first_n_scale or len(self.vision.ps3_scales) - 1
                cells = sum(h * w for h, w in self.vision.feature_sizes(*size)[1:][:covered])
                if min(tokens, cells) <= self.step:
                    looks, tokens = 1, min(tokens, cells)
        return Budget(looks, tokens, budget.only_select_first_n_scale)

    def check_budget(self, budget: Budget, size: tuple[int, int]) -> None:
        """RequestError 400 naming the field unless the encoder accepts this budget for an input
        of ``size``; checked without running the model."""
        try:
            self.vision.count_tokens(*size, num_look_close=budget.num_look_close,
                                     num_token_look_close=budget.num_token_look_close,
                                     only_select_first_n_scale=budget.only_select_first_n_scale)
        except (ValueError, TypeError) as exc:
            raise RequestError(400, str(exc).splitlines()[0]) from exc

    def empty_maps(self, size: tuple[int, int]) -> list[torch.Tensor]:
        return [torch.zeros(1, h, w, dtype=torch.bool) for h, w in self.vision.feature_sizes(*size)[1:]]

    # ------------------------------------------------------------------ worker side
    def run(self, jobs: list[Job]) -> None:
        """Encode ``jobs`` (one batch) and complete their futures; a job cancelled before it started
        is skipped. Never raises: a failure goes to the futures (one by one, so that a request
        that breaks the batch's call fails alone)."""
        jobs = [j for j in jobs if j.future.set_running_or_notify_cancel()]
        if jobs:
            self._run(jobs)

    def _run(self, jobs: list[Job]) -> None:
        try:
            self._resolve_images(jobs)
            parts: dict[tuple, list[Job]] = {}
            for j in jobs:
                b = j.budget
                sig = (b.num_look_close is None, b.num_token_look_close is None, b.only_select_first_n_scale is None)
                parts.setdefault(sig, []).append(j)
            results = {}
            for part in parts.values():
                results.update(zip(map(id, part), self._encode(part)))
        except Exception as exc:  # noqa: BLE001 - the futures carry it to the requests
            if len(jobs) == 1:
                jobs[0].future.set_exception(exc)
                return
            for j in jobs:  # retry alone: only the request that fails gets the error
                self._run([j])
            return
        for j in jobs:
            j.future.set_result(results[id(j)])

    def _resolve_images(self, jobs: list[Job]) -> None:
        missing: dict[tuple, list[Job]] = {}
        for j in jobs:
            if j.cached is None:
                j.cached = self.cache.get(j.key, count=False)
            if j.cached is None:
                missing.setdefault(j.key, []).append(j)
        if not missing:
            return
        firsts = [group[0] for group in missing.values()]
        with torch.no_grad():
            low = self.vision.encode_low_res([self.normalise(j.pixels) for j in firsts])
        with self._counter_lock:
            self.low_res_images += len(firsts)
        for first, one in zip(firsts, split_low_res(low)):
            entry = CachedImage(first.pixels, first.image_size, one)
            self.cache.put(first.key, entry)
            for j in missing[first.key]:
                j.cached = entry

    def _prompts(self, jobs: list[Job]) -> torch.Tensor | None:
        texts = list(dict.fromkeys(j.prompt for j in jobs if j.prompt is not None))
        if not texts:
            return None
        found = dict(zip(texts, self.loaded.prompts(texts)))
        prior = self.vision.prior_prompt.detach()
        return torch.stack([found[j.prompt].to(prior.dtype) if j.prompt is not None else prior for j in jobs])

    def _encode(self, jobs: list[Job]) -> list[JobResult]:
        def per_job(name):
            values = [getattr(j.budget, name) for j in jobs]
            return None if values[0] is None else values

        names = ("num_look_close", "num_token_look_close", "only_select_first_n_scale")
        kwargs = {name: per_job(name) for name in names}
        if any(j.old_maps is not None for j in jobs):  # look-closer turns: the others have encoded nothing yet
            maps = [j.old_maps or self.empty_maps(tuple(j.cached.pixels.shape[-2:])) for j in jobs]
            kwargs["old_selection_maps"] = old_maps_argument(maps, self.loaded.device)
        with torch.no_grad():
            out = self.vision.encode_looks([self.normalise(j.cached.pixels) for j in jobs], prompt=self._prompts(jobs),
                                           low_res=stack_low_res([j.cached.low_res for j in jobs]),
                                           num_hidden_layers_to_return=1, **kwargs)
        results = []
        for j, one in zip(jobs, out.per_sample()):
            maps = [m.cpu() for m in one.selection_maps] if one.selection_maps is not None else []
            results.append(JobResult(one.last_hidden_state.cpu(), maps, j.cached))
        with self._counter_lock:
            self.tokens_encoded += sum(r.last_hidden_state.shape[1] for r in results)
        return results


def old_maps_argument(maps: list[list[torch.Tensor]], device: torch.device) -> list[torch.Tensor]:
    """Per-job lists of (1, h_i, w_i) maps → per scale one (B, h_max, w_max) map, each job's grid
    at the top-left (the layout of a mixed call's maps)."""
    out = []
    for scale in range(len(maps[0])):
        parts = [m[scale] for m in maps]
        h, w = max(p.shape[-2] for p in parts), max(p.shape[-1] for p in parts)
        merged = torch.zeros(len(parts), h, w, dtype=torch.bool)
        for b, p in enumerate(parts):
            merged[b, :p.shape[-2], :p.shape[-1]] = p[0]
        out.append(merged.to(device))
    return out

