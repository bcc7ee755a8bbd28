"""What every command line and benchmark shares: user errors, device/dtype parsing, timing with
device sync and peak memory, and loading a model with its processor, text tower and tokenizer.

Errors: library code raises ``ValueError``/``TypeError``/``OSError`` naming the argument. A command
turns the failures that are the user's into :class:`UserError` where it hands user input to that
code (``with user_input("--model"): ...``), and :func:`run_command` prints only a ``UserError`` as
one line. Any other exception is a bug and keeps its traceback, even a ``ValueError`` raised deep
inside. ``PS3_DEBUG=1`` shows the traceback of user errors too.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from .hub import resolve_model_dir
from .encoder.precision import CpuCapability, cpu_capability, native_dtype

__all__ = ["UserError", "user_input", "run_command", "DTYPE_NAMES", "parse_device", "parse_dtype",
           "synchronize", "timeit", "matmul_rate", "matmul_rates", "Measurement", "measure", "LoadedModel",
           "load_model",
           "CpuCapability", "cpu_capability", "native_dtype"]

# The dtype names the command lines offer (parse_dtype also takes the aliases below).
DTYPE_NAMES = ("float32", "bfloat16", "float16")
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


# ------------------------------------------------------------------------------------------ errors
class UserError(ValueError):
    """A mistake the user can fix (a flag, a file, a model name); a command prints it as one line.

    A ``ValueError`` so that library callers catching ``ValueError`` keep working."""


def _first_line(exc: BaseException) -> str:
    text = str(exc)
    return text.splitlines()[0] if text.strip() else type(exc).__name__


@contextmanager
def user_input(flag: str | None = None,
               errors: tuple[type[BaseException], ...] = (ValueError, TypeError, OSError)) -> Iterator[None]:
    """Treat ``errors`` raised inside as the user's mistake: re-raise them as :class:`UserError`,
    prefixed with ``flag`` unless the message already names it.

    Wrap only code that checks or reads what the user passed (parsing a flag, opening their
    files, loading their model), so a bug elsewhere still shows its traceback."""
    try:
        yield
    except UserError:
        raise
    except errors as exc:
        message = _first_line(exc)
        if flag and flag not in message:
            message = f"{flag}: {message}"
        raise UserError(message) from exc


def run_command(func: Callable[[argparse.Namespace], Any], args: argparse.Namespace, prog: str) -> int:
    """Run a command's function: its return value as the exit code (None → 0), a :class:`UserError`
    as one line on stderr and exit code 2, Ctrl-C as exit code 130. Anything else propagates."""
    try:
        return int(func(args) or 0)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except UserError as exc:
        if os.environ.get("PS3_DEBUG"):
            raise
        print(f"{prog}: error: {_first_line(exc)}", file=sys.stderr)
        return 2


# ------------------------------------------------------------------------------------------ device and dtype
def parse_device(device: str | torch.device | None = None) -> torch.device:
    """``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"`` or a ``torch.device`` (None: cpu), checked to
    exist on this machine; ``ValueError`` otherwise."""
    if device is None:
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device must be cpu, cuda, cuda:N or mps, got {device!r}") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} given but CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} given but this machine has {torch.cuda.device_count()} CUDA devices")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r} given but MPS is not available on this machine")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device must be cpu, cuda, cuda:N or mps, got {device!r}")
    return dev


def parse_dtype(dtype: str | torch.dtype | None, device: str | torch.device | None = None) -> torch.dtype:
    """A dtype name (``float32``, ``bfloat16``, ``float16``, or an alias such as ``bf16``) or a
    ``torch.dtype``; None: float32 on a CPU, bfloat16 on an accelerator. ``ValueError`` otherwise.
    The one dtype parser of the package (``from_pretrained`` keeps the stored dtype for None itself)."""
    if dtype is None:
        return torch.float32 if parse_device(device).type == "cpu" else torch.bfloat16
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype in _DTYPES:
        return _DTYPES[dtype]
    raise ValueError(f"dtype must be a torch dtype or one of {sorted(_DTYPES)}, got {dtype!r}")


# ------------------------------------------------------------------------------------------ timing and memory
def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU), so a clock reading covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def timeit(fn: Callable[[], Any], device: torch.device, repeats: int = 3, best: bool = False,
           warmup: bool = True) -> float:
    """Median (or best) seconds of ``repeats`` calls of ``fn``, each waited for on ``device``,
    after one untimed warm-up call (unless ``warmup=False``)."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if warmup:
        fn()
        synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return min(times) if best else statistics.median(times)


# A reference product should take under this long: a dtype the machine multiplies slowly (bf16
# without bf16 units runs at ~1/60 of float32 on a CPU) is measured on a smaller product.
_MATMUL_CALL_BUDGET_S = 0.25


def matmul_rate(device: torch.device, dtype: torch.dtype = torch.float32, n: int | None = None) -> float:
    """FLOP/s of an n×n @ n×n matmul: the best of 10, as a reference must be the machine's ceiling
    (a shared machine's slow moments would otherwise flatter every figure compared with it).

    Without ``n``: the largest power of two up to 2048 on a CPU (8192 on an accelerator) whose
    product takes under a quarter of a second, grown from 256, so that a slow dtype costs seconds
    rather than minutes; a dtype at the machine's usual rates gets the full size."""
    size = n or _matmul_size(device, dtype, 2048 if device.type == "cpu" else 8192)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    return 2 * size ** 3 / timeit(lambda: a @ b, device, 10, best=True)


def _matmul_size(device: torch.device, dtype: torch.dtype, largest: int) -> int:
    n = 256
    while n < largest:
        a = torch.randn(n, n, device=device, dtype=dtype)
        seconds = timeit(lambda: a @ a, device, 1)
        if 8 * seconds > _MATMUL_CALL_BUDGET_S:  # doubling n multiplies the work by 8
            break
        n *= 2
    return n


def matmul_rates(device: torch.device, dtypes=(torch.float32, torch.bfloat16)) -> dict[torch.dtype, float]:
    """:func:`matmul_rate` of each dtype, measured one after the other in this call (so their
    ratio is from one moment of a shared machine): the reference each figure of that dtype is
    compared with. On a CPU a bf16 rate far above float32 means bf16 units (``cpu_capability``)."""
    return {dt: matmul_rate(device, dt) for dt in dict.fromkeys(dtypes)}


def _cpu_resident_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except OSError:
        return None


def _reset_cpu_peak() -> bool:
    """Reset this process's peak resident set (Linux's VmHWM); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _cpu_peak_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        # The process's lifetime peak: KiB on Linux, bytes on macOS.
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


@dataclass
class Measurement:
    """Seconds and memory of the code run under :func:`measure`.

    ``peak_bytes``: the most memory in use while it ran (CUDA: the allocator's peak; CPU: the
    process's peak resident set, Linux); ``start_bytes``: what was in use when it started.
    Where the CPU peak cannot be reset (not Linux), the peak is the process's lifetime peak and
    ``start_bytes`` is 0."""
    seconds: float = 0.0
    peak_bytes: int = 0
    start_bytes: int = 0

    @property
    def extra_bytes(self) -> int:
        """Peak memory beyond what was in use at the start."""
        return self.peak_bytes - self.start_bytes


@contextmanager
def measure(device: torch.device) -> Iterator[Measurement]:
    """Time the ``with`` block (device work included) and record its peak memory."""
    result = Measurement()
    synchronize(device)
    if device.type == "cuda":
        result.start_bytes = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    elif device.type == "cpu" and _reset_cpu_peak():
        result.start_bytes = _cpu_resident_bytes() or 0
    start = time.perf_counter()
    yield result
    synchronize(device)
    result.seconds = time.perf_counter() - start
    result.peak_bytes = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _cpu_peak_bytes()


# ------------------------------------------------------------------------------------------ loading a model
@dataclass
class LoadedModel:
    """A PS3 model directory loaded for encoding: the vision tower, its image processor, and (when
    asked for) the text tower and tokenizer that turn a caption into a selection prompt."""
    directory: Path
    vision: Any  # PS3VisionModel
    processor: Any  # PS3ImageProcessor
    text: Any = None  # PS3TextModel
    tokenizer: Any = None  # PS3Tokenizer

    @property
    def device(self) -> torch.device:
        return next(self.vision.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vision.parameters()).dtype

    def pixel_values(self, image: Any, image_size: int | None = None) -> torch.Tensor:
        """One image (path, PIL image or bytes) preprocessed for the model: (1, 3, H, W) on its
        device and dtype."""
        return self.processor(image, image_size=image_size)["pixel_values"][0][None].to(self.device, self.dtype)

    def prompts(self, texts: list[str]) -> torch.Tensor:
        """Selection prompts (B, width) for ``texts`` (top-down selection)."""
        if self.text is None or self.tokenizer is None:
            raise ValueError(f"prompts need the text tower and tokenizer: load {self.directory} with text=True")
        with torch.no_grad():
            return self.text(self.tokenizer(list(texts)).to(self.device)).prompt


def load_model(model: str | os.PathLike, *, device: str | torch.device | None = None,
               dtype: str | torch.dtype | None = None, text: bool = False, **hub_kwargs: Any) -> LoadedModel:
    """Load a PS3 model directory or hub id once for encoding.

    The processor comes from ``preprocessor_config.json`` (without one: the model's largest
    scale, default normalisation). ``text=True`` also loads the text tower and tokenizer and fails
    with a ValueError naming the missing file when the model has none. ``dtype`` None: float32."""
    from .processor import PREPROCESSOR_NAME, PS3ImageProcessor
    from .encoder.vision import PS3VisionModel

    dev = parse_device(device)
    dt = torch.float32 if dtype is None else parse_dtype(dtype)
    directory = resolve_model_dir(model, **hub_kwargs)
    if text and not (directory / "tokenizer_config.json").is_file():
        raise ValueError(f"a text prompt needs a tokenizer: {directory} has no tokenizer_config.json")
    vision = PS3VisionModel.from_pretrained(directory, dtype=dt, device=dev)
    if (directory / PREPROCESSOR_NAME).is_file():
        processor = PS3ImageProcessor.from_pretrained(directory)
    else:
        processor = PS3ImageProcessor(image_size=vision.config.ps3_scales[-1])
    loaded = LoadedModel(directory, vision, processor)
    if text:
        from .text import PS3TextModel
        from .tokenizer import PS3Tokenizer

        loaded.tokenizer = PS3Tokenizer.from_pretrained(directory)
        loaded.text = PS3TextModel.from_pretrained(directory, dtype=dt, device=dev)
    return loaded
