"""Low precision on the CPU: whether this CPU multiplies bf16/fp16 in hardware, attention in bf16
at the fastest formulation measured here, and a float32 fallback where there are no units.

* Attention: on a 2-core AMD Zen 4 (avx512_bf16) SDPA in bf16 ran no faster than in float32, and
  batched matmuls over all heads for chunks of 128 queries with a softmax between them ran 1.4x
  faster; on an Intel Xeon with AMX SDPA in bf16 ran 2.3x faster than those chunks. So bf16/fp16
  inference attention is chosen by timing both on the machine and shapes it runs on
  (``ps3.encoder.kernels``; docs/low_precision.md). ``torch.compile`` of SDPA, of a matmul+softmax
  graph and ``flex_attention`` measured no better on the Zen 4 (``benchmarks/attention_bf16.py
  --compile``). float32 has one formulation: SDPA (the chunks ran 2.3x slower on both machines).
* The float32 fallback is decided by the CPU's flags and oneDNN's ISA, not timed: without bf16
  units (no avx512_bf16/amx_bf16) a bf16 matmul is emulated at 0.6x the float32 rate with
  AVX-512 and ~1/60 of it with AVX2 only (fp16 ~1/60 without avx512_fp16/amx_fp16), so timing the
  emulated candidate on a real shape would cost more than the whole timing budget; with units
  the bf16 product measured 2.2-6.5x float32 on every CPU measured. A low-precision call on a
  CPU without units computes in float32 and returns the caller's dtype.

``PS3_CPU_LOW_PRECISION`` overrides the detection: ``native`` (compute in bf16/fp16 as asked),
``float32`` (always fall back), ``auto`` (default).
"""
from __future__ import annotations

import functools
import itertools
import os
from dataclasses import dataclass, fields, is_dataclass, replace
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .kernels import OPS, chooser, shape_class

__all__ = ["CpuCapability", "cpu_capability", "native_dtype", "attention", "float32_fallback"]

LOW_PRECISION = (torch.bfloat16, torch.float16)
_OVERRIDE_ENV = "PS3_CPU_LOW_PRECISION"
_FLAGS_OF_INTEREST = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "avx512_fp16", "amx_fp16", "amx_tile")
# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) that still let it use bf16 / fp16 instructions.
_ONEDNN_BF16_ISAS = {"AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX", "AVX512_CORE_AMX_FP16",
                     "AVX10_1_512", "AVX10_1_512_AMX", "AVX10_1_512_AMX_FP16", "AVX10_2_512",
                     "AVX10_2_512_AMX_2", "ALL", "DEFAULT"}
_ONEDNN_FP16_ISAS = {"AVX512_CORE_FP16", "AVX512_CORE_AMX_FP16", "AVX10_1_512", "AVX10_1_512_AMX_FP16",
                     "AVX10_2_512", "AVX10_2_512_AMX_2", "ALL", "DEFAULT"}


@dataclass(frozen=True)
class CpuCapability:
    """What this CPU and this torch build can do in low precision.

    ``aten``: ``torch.backends.cpu.get_cpu_capability()`` (the vector ISA ATen's kernels use);
    ``flags``: the relevant /proc/cpuinfo flags (empty where there is no such file);
    ``onednn_bf16`` / ``onednn_fp16``: whether oneDNN (torch's matmul backend for bf16/fp16) takes
    those dtypes here; ``max_isa``: ``ONEDNN_MAX_CPU_ISA`` when set (it caps oneDNN's ISA)."""
    aten: str
    flags: frozenset[str]
    onednn_bf16: bool
    onednn_fp16: bool
    max_isa: str | None = None

    @property
    def native_bf16(self) -> bool:
        """bf16 matmuls run on bf16 units (AVX-512 BF16 or AMX), not emulated."""
        units = bool(self.flags & {"avx512_bf16", "amx_bf16"})
        return self.onednn_bf16 and units and (self.max_isa is None or self.max_isa in _ONEDNN_BF16_ISAS)

    @property
    def native_fp16(self) -> bool:
        """fp16 matmuls run on fp16 units (AVX-512 FP16 or AMX-FP16)."""
        units = bool(self.flags & {"avx512_fp16", "amx_fp16"})
        return self.onednn_fp16 and units and (self.max_isa is None or self.max_isa in _ONEDNN_FP16_ISAS)

    def as_dict(self) -> dict[str, Any]:
        return {"aten_capability": self.aten, "cpu_flags": sorted(self.flags), "onednn_bf16": self.onednn_bf16,
                "onednn_fp16": self.onednn_fp16, "onednn_max_isa": self.max_isa, "native_bf16": self.native_bf16,
                "native_fp16": self.native_fp16}

    def describe(self) -> str:
        units = [name for name, yes in (("bf16", self.native_bf16), ("fp16", self.native_fp16)) if yes]
        return (f"CPU {self.aten}, flags {' '.join(sorted(self.flags)) or 'unknown'}; multiplies "
                + (" and ".join(units) + " natively" if units else "no low precision natively (bf16/fp16 calls "
                   "compute in float32)"))


def _cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            line = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return frozenset()
    return frozenset(line.partition(":")[2].split()) & frozenset(_FLAGS_OF_INTEREST)


def _onednn_supports(name: str) -> bool:
    probe = getattr(torch.ops.mkldnn, name, None)
    try:
        return bool(probe()) if probe is not None and torch.backends.mkldnn.is_available() else False
    except RuntimeError:
        return False


@functools.lru_cache(maxsize=1)
def cpu_capability() -> CpuCapability:
    """This machine's :class:`CpuCapability` (read once)."""
    return CpuCapability(aten=torch.backends.cpu.get_cpu_capability(), flags=_cpu_flags(),
                         onednn_bf16=_onednn_supports("_is_mkldnn_bf16_supported"),
                         onednn_fp16=_onednn_supports("_is_mkldnn_fp16_supported"),
                         max_isa=os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() or None)


def native_dtype(dtype: torch.dtype, device: torch.device | str = "cpu") -> bool:
    """Whether ``dtype`` is computed at least as fast as float32 on ``device``: always on an
    accelerator and for float32/float64; bf16/fp16 on a CPU only with hardware units for them
    (``PS3_CPU_LOW_PRECISION`` = native / float32 overrides)."""
    if torch.device(device).type != "cpu" or dtype not in LOW_PRECISION:
        return True
    override = os.environ.get(_OVERRIDE_ENV, "auto").lower()
    if override not in ("auto", "native", "float32"):
        raise ValueError(f"{_OVERRIDE_ENV} must be auto, native or float32, got {override!r}")
    if override != "auto":
        return override == "native"
    cap = cpu_capability()
    return cap.native_bf16 if dtype == torch.bfloat16 else cap.native_fp16


# ------------------------------------------------------------------------------------------ attention
# Queries per product in the chunked attention: 128 measured fastest on a 2-core Zen 4 (64 and
# 256 slower): the (heads, 128, keys) score block stays in cache between the two products.
ATTENTION_CHUNK = 128
# Below this many query-key pairs a call goes to SDPA untimed: the chunk loop's overhead
# dominates there, and timing such a call would cost more than any choice could gain.
_CHUNKED_MIN_PAIRS = 2**16
# Queries the attention candidates are timed on (four chunks: fewer measured mostly per-call
# overhead on a busy machine).
_PROBE_QUERIES = 4 * ATTENTION_CHUNK


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``F.scaled_dot_product_attention(q, k, v, attn_mask)`` for q (B, H, N, d), k/v (B, H, P, d)
    and an optional bool mask broadcastable to (B, H, N, P) (True: attend).

    bf16/fp16 inference on a CPU with units for them picks, by measurement on this machine
    (``ps3.encoder.kernels``, op ``attention``; ``PS3_ATTENTION=sdpa|chunked`` forces one),
    between SDPA and chunked matmuls with a softmax between them (see the module docstring); the chunked formulation rounds the scores to the
    input dtype before the softmax, as any non-fused attention in that dtype, so the two agree to
    the dtype's rounding. bf16/fp16 training on a CPU with units for them runs as autograd through
    matmuls (SDPA's fused CPU backward is slow there)."""
    if (q.device.type == "cpu" and q.dtype in LOW_PRECISION and _needs_grad(q, k, v) and _math_applies(q, k)
            and native_dtype(q.dtype, q.device)):
        return _math_attention(q, k, v, attn_mask)
    if not _chunked_applies(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    B, H, N, d = q.shape
    P = k.shape[-2]
    key = (f"cpu {str(q.dtype)[6:]} {'masked' if attn_mask is not None else 'no mask'} "
           f"B*H {shape_class(B * H)} N {shape_class(N)} P {shape_class(P)} d {d}")
    default = "chunked"  # used untimed once the budget is spent: what measured fastest on a Zen 4
    # Each query row is independent: the candidates are timed on the call's first queries (all
    # its keys, heads and mask), which costs a fraction of the call, then the winner runs it.
    rows = min(N, _PROBE_QUERIES)
    probe_q = q[:, :, :rows]
    probe_mask = attn_mask if attn_mask is None or attn_mask.shape[-2] == 1 else attn_mask[..., :rows, :]
    return chooser().run(
        OPS["attention"], key, q.device,
        {"sdpa": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask),
         "chunked": lambda: _chunked_attention(q, k, v, attn_mask)}, default,
        flops=4.0 * B * H * rows * P * d,
        probes={"sdpa": lambda: F.scaled_dot_product_attention(probe_q, k, v, attn_mask=probe_mask),
                "chunked": lambda: _chunked_attention(probe_q, k, v, probe_mask)})


def _needs_grad(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)


def _chunked_applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the chunked formulation is a candidate of :func:`attention` for these inputs. Not in
    float32: there SDPA's fused kernel ran at ~80% of the float32 matmul rate and the chunked
    formulation 2.3x slower (docs/low_precision.md), so float32 keeps one formulation."""
    return (q.device.type == "cpu" and not _needs_grad(q, k, v) and q.shape[-2] * k.shape[-2] >= _CHUNKED_MIN_PAIRS
            and q.dtype in LOW_PRECISION and native_dtype(q.dtype, q.device))


# Training in bf16 on a CPU: SDPA's fused backward ran at ~8 GFLOP/s (a mid-size training step
# spent a fifth of its time there), while autograd through two batched matmuls and a softmax
# runs at the bf16 matmul rate. The probabilities are kept for the backward pass, so this path
# is taken while they stay under this many bytes (training sequences are short).
_MATH_MAX_BYTES = 512 * 2**20


def _math_applies(q: torch.Tensor, k: torch.Tensor) -> bool:
    return q.shape[:-1].numel() * k.shape[-2] * q.element_size() <= _MATH_MAX_BYTES


def _math_attention(q, k, v, attn_mask):
    """softmax(q·kᵀ/√d + mask)·v with autograd, in the inputs' dtype."""
    scores = torch.matmul(q * q.shape[-1] ** -0.5, k.transpose(-2, -1))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), v)


def _chunked_attention(q, k, v, attn_mask):
    B, H, N, d = q.shape
    P = k.shape[-2]
    c = ATTENTION_CHUNK
    chunks = -(-N // c)
    # Queries and outputs in (chunks, B·H, c, d) blocks: each product covers every image and head
    # of one chunk, its operand and result one contiguous block (oneDNN copies a strided one first,
    # once per product). The queries are scaled into that layout in one copy (exact for
    # power-of-two head widths, one rounding of the input otherwise); the last block's rows past N
    # are zeros, computed and dropped.
    blocks = q.new_zeros(B, H, chunks * c, d)
    blocks[:, :, :N] = q
    queries = blocks.mul_(d ** -0.5).view(B * H, chunks, c, d).transpose(0, 1).contiguous()
    out = torch.empty_like(queries)
    keys_t = k.contiguous().view(B * H, P, d).transpose(1, 2)  # no copies for a cache
    values = v.contiguous().view(B * H, P, d)
    if attn_mask is not None:
        attn_mask = F.pad(attn_mask.expand(B, H, N, P), (0, 0, 0, chunks * c - N), value=True).reshape(B * H, -1, P)
    # The score and probability blocks (B·H, c, P) are reused by every chunk: fresh ~10 MB tensors
    # per chunk were measured to cost 4x the softmax itself (new pages each time).
    scores = q.new_empty(B * H, c, P)
    probs = torch.empty_like(scores)
    for j in range(chunks):
        torch.bmm(queries[j], keys_t, out=scores)
        if attn_mask is not None:
            scores.masked_fill_(~attn_mask[:, j * c:(j + 1) * c], float("-inf"))
        torch._softmax(scores, -1, False, out=probs)
        torch.bmm(probs, values, out=out[j])
    # (chunks, B, H, c, d) → (B, N, H, d) in memory, which the caller's transpose-and-reshape to
    # (B, N, H·d) reads as a view.
    out = out.view(chunks, B, H, c, d).permute(1, 0, 3, 2, 4).contiguous().view(B, chunks * c, H, d)
    return out[:, :N].transpose(1, 2)


# ------------------------------------------------------------------------------------------ float32 fallback
def float32_fallback(method: Callable) -> Callable:
    """Decorate a module's entry point so that, when the module's weights are bf16/fp16 on a CPU
    without units for that dtype, the call computes in float32 (weights, and inputs of that dtype)
    and returns its floating outputs in the module's dtype: never slower than a float32 call.

    The float32 weights are made once and kept while the module's weights are unchanged (the
    memory of a float32 model, beside the low-precision one). Calls that train (grad enabled on
    weights that require it) run as asked. Not for concurrent calls on one module from several
    threads (the weights are swapped for the call)."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        weight = next(self.parameters(), None)
        if weight is None or native_dtype(weight.dtype, weight.device) or (
                torch.is_grad_enabled() and weight.requires_grad):
            return method(self, *args, **kwargs)
        dtype = weight.dtype
        with _float32_weights(self, dtype):
            out = method(self, *_cast(args, dtype, torch.float32), **_cast(kwargs, dtype, torch.float32))
        return _cast(out, torch.float32, dtype)

    return wrapper


class _float32_weights:
    """Swap a module's ``dtype`` parameters and buffers for cached float32 copies while inside."""

    def __init__(self, module: torch.nn.Module, dtype: torch.dtype):
        self.tensors = [t for t in itertools.chain(module.parameters(), module.buffers()) if t.dtype == dtype]
        key = tuple((t.data_ptr(), t._version) for t in self.tensors)
        cached = getattr(module, "_ps3_float32_weights", None)
        if cached is None or cached[0] != key:
            cached = (key, [t.detach().float() for t in self.tensors])
            object.__setattr__(module, "_ps3_float32_weights", cached)  # not a submodule or parameter
        self.copies = cached[1]

    def __enter__(self):
        self.originals = [t.data for t in self.tensors]
        for t, copy in zip(self.tensors, self.copies):
            t.data = copy

    def __exit__(self, *exc):
        for t, original in zip(self.tensors, self.originals):
            t.data = original


def _cast(value: Any, source: torch.dtype, target: torch.dtype, seen: dict[int, torch.Tensor] | None = None) -> Any:
    """``value`` with every tensor of dtype ``source`` inside it (lists, tuples, dicts,
    dataclasses) converted to ``target``. A tensor met twice is converted once, so aliases stay
    aliases (``last_hidden_state`` is ``hidden_states[-1]``) and no memory is spent twice."""
    seen = {} if seen is None else seen
    if isinstance(value, torch.Tensor):
        if value.dtype != source:
            return value
        if id(value) not in seen:
            seen[id(value)] = value.to(target)
        return seen[id(value)]
    if isinstance(value, (list, tuple)):
        items = [_cast(v, source, target, seen) for v in value]
        return type(value)(items) if not hasattr(value, "_fields") else type(value)(*items)
    if isinstance(value, dict):
        return {k: _cast(v, source, target, seen) for k, v in value.items()}
    if is_dataclass(value) and not isinstance(value, type):
        return replace(value, **{f.name: _cast(getattr(value, f.name), source, target, seen) for f in fields(value)
                                 if f.init})
    return value
