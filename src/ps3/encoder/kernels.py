"""Kernel choice by measurement: where two formulations of one operation compute the same thing,
the faster one on *this* machine, for *these* shapes, is timed and kept.

An :class:`Op` names its candidates (all agree to the dtype's rounding), a default and the
environment variable that forces one. At the first call of a (op, device, dtype, shape class)
:meth:`KernelChooser.run` times the candidates on the call's own inputs and returns the
winner's result; every later call of that class runs the winner without timing. What the
timing costs beyond the call itself is charged to a budget (``BUDGET_S`` per process in all,
each op its share): each probe runs once untimed (warm-up), each candidate is timed once while
any budget is left, then once more where the first round was close (within ``DECISIVE``) and a
repeat (``REPEAT_ALLOWANCE`` x its first time) still fits, and another candidate replaces the
default only when more than ``TIE_MARGIN`` faster; once the budget is spent, new
classes take the default untimed. Only a run that outlasts its allowance (a stalled machine)
can take the total past the budget, and such excess is counted (``overrun_s``).

Choices persist in a small JSON file keyed by CPU model, core count, thread count and torch
version, so a second process on the same machine times nothing: ``$PS3_KERNEL_CACHE`` is its
path (``off`` disables it; default ``<user cache dir>/ps3/kernels.json``). A forced or
persisted choice runs the chosen candidate directly: no timing at all.
"""
from __future__ import annotations

import json
import math
import os
import platform
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

__all__ = ["Op", "Choice", "KernelChooser", "OPS", "chooser", "shape_class", "cache_path", "machine_key"]

BUDGET_S = 1.0
# A repeat of a timed run is allowed this many times its first time (noise on a shared machine).
REPEAT_ALLOWANCE = 1.5
# Another candidate replaces the default only when it times more than this much faster.
TIE_MARGIN = 0.05
# A first round whose slowest candidate took more than this times the fastest is not repeated.
DECISIVE = 1.5
CACHE_ENV = "PS3_KERNEL_CACHE"
_CACHE_VERSION = 1


@dataclass(frozen=True)
class Op:
    """One operation with interchangeable formulations; ``budget_s``: its share of the process's
    timing budget."""
    name: str
    candidates: tuple[str, ...]
    env: str
    doc: str
    budget_s: float

    def forced(self) -> str | None:
        value = os.environ.get(self.env, "").strip().lower()
        if value in ("", "auto"):
            return None
        if value not in self.candidates:
            raise ValueError(f"{self.env} must be auto or one of {', '.join(self.candidates)}, got {value!r}")
        return value


OPS = {op.name: op for op in (
    Op("attention", ("sdpa", "chunked"), "PS3_ATTENTION",
       "inference attention on a CPU: F.scaled_dot_product_attention, or batched matmuls over 128-query "
       "chunks with a softmax between them (timed on the call's first queries)", budget_s=0.5),
    Op("conv_stem", ("conv", "matmul"), "PS3_CONV_STEM",
       "the 1512 px ConvNet's patchify stem: nn.Conv2d, or one matmul over the gathered patches (timed on a "
       "quarter of the call's patch rows)", budget_s=0.5),
)}
assert sum(op.budget_s for op in OPS.values()) <= BUDGET_S


@dataclass
class Choice:
    """What was chosen for one class, and why: ``source`` is measured, forced, persisted, default
    (budget spent), or only (a single candidate applies). ``seconds``: each timed candidate's best
    time; ``flops`` of one call where the op states it (for rates)."""
    op: str
    key: str
    winner: str
    source: str
    seconds: dict[str, float] = field(default_factory=dict)
    flops: float | None = None
    cost_s: float = 0.0

    def describe(self) -> str:
        def rate(s: float) -> str:
            return f", {self.flops / s / 1e9:.0f} GFLOP/s" if self.flops else ""
        timed = "; ".join(f"{name} {s * 1e3:.1f} ms{rate(s)}" for name, s in self.seconds.items())
        return f"{self.op} [{self.key}]: {self.winner} ({self.source}{': ' + timed if timed else ''})"

    def as_dict(self) -> dict[str, Any]:
        return {"op": self.op, "key": self.key, "winner": self.winner, "source": self.source,
                "seconds": self.seconds, "flops": self.flops, "cost_s": self.cost_s}


def shape_class(*dims: int) -> str:
    """Sizes rounded up to powers of two, joined: calls of one class share a choice."""
    return "x".join(str(1 << max(int(d) - 1, 0).bit_length()) for d in dims)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_key() -> str:
    """What a persisted choice is valid for: CPU model, cores, torch's threads, torch version."""
    return f"{_cpu_model()} | {os.cpu_count()} cores | {torch.get_num_threads()} threads | torch {torch.__version__}"


def cache_path() -> Path | None:
    """Where choices persist (``$PS3_KERNEL_CACHE``; ``off`` → None)."""
    value = os.environ.get(CACHE_ENV, "").strip()
    if value.lower() in ("off", "0", "none", "false"):
        return None
    if value:
        return Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ps3" / "kernels.json"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class KernelChooser:
    """Per-process choices and the timing budget (see the module docstring). ``budget_s``: the
    process's total; each op may spend its own share (``Op.budget_s``) of it."""

    def __init__(self, budget_s: float = BUDGET_S):
        self.budget_s = budget_s
        self.spent: dict[str, float] = {}
        # Seconds timed runs took beyond what the budget check allowed them (a first run longer
        # than the budget left, a repeat far slower than the first): spent_s <= budget_s + this.
        self.overrun_s = 0.0
        self.choices: dict[tuple[str, str], Choice] = {}
        self._persisted: dict[str, dict] | None = None
        self._lock = threading.RLock()

    @property
    def spent_s(self) -> float:
        """Seconds of timing beyond the calls themselves, so far, all ops together."""
        return sum(self.spent.values())

    def _left(self, op: Op) -> float:
        return min(op.budget_s - self.spent.get(op.name, 0.0), self.budget_s - self.spent_s)

    # ------------------------------------------------------------------ the entry point
    def run(self, op: Op, key: str, device: torch.device, candidates: Mapping[str, Callable[[], Any]],
            default: str, flops: float | None = None,
            probes: Mapping[str, Callable[[], Any]] | None = None) -> Any:
        """Result of the chosen candidate for class ``key`` (include device and dtype in it).
        ``candidates``: the formulations that apply to this call, each a thunk computing it.
        ``probes``: where given, thunks timed instead (the candidates on a part of the call's
        input, for ops whose one call would not fit the budget twice); the call then runs the
        winner, and every probe run is charged to the budget."""
        assert default in candidates and set(candidates) <= set(op.candidates), (default, list(candidates))
        forced = op.forced()
        if torch.compiler.is_compiling():  # a graph being traced: no timing, no side effects
            return candidates[forced if forced in candidates else default]()
        if forced is not None and forced in candidates:
            self._record(Choice(op.name, key, forced, "forced"))
            return candidates[forced]()
        with self._lock:
            choice = self.choices.get((op.name, key))
            if choice is None:
                choice = self._persisted_choice(op, key)
            if choice is None and len(candidates) == 1:
                choice = self._record(Choice(op.name, key, default, "only"))
            if choice is None:
                names = [default] + [n for n in candidates if n != default]
                if probes is None:
                    return self._measure(op, key, device, candidates, names, flops, first_is_call=True)
                self._measure(op, key, device, {n: probes[n] for n in names}, names, flops, first_is_call=False)
                choice = self.choices[(op.name, key)]
        return candidates[choice.winner if choice.winner in candidates else default]()

    def _record(self, choice: Choice) -> Choice:
        self.choices.setdefault((choice.op, choice.key), choice)
        return choice

    # ------------------------------------------------------------------ timing
    def _measure(self, op, key, device, thunks, names, flops, first_is_call):
        """Probes are run once each untimed (warm-up). Then each thunk is timed once, the default
        (``names[0]``) first, each while budget is left; then
        a second round in reverse order where each repeat fits, each keeping its best time.
        ``first_is_call``: the first run is the call itself (not charged); returns the winner's
        result. A run longer than its allowance adds the excess to ``overrun_s``."""
        default = names[0]
        if self._left(op) <= 0:
            self._record(Choice(op.name, key, default, "default (budget spent)", flops=flops))
            return thunks[default]() if first_is_call else None
        best: dict[str, float] = {}
        result, result_of, cost, left = None, None, 0.0, self._left(op)
        if not first_is_call:
            # One untimed run of each probe first (charged): a new shape's first run also builds
            # its kernels (oneDNN compiles each matmul shape once), which the call will not pay.
            for name in names:
                if cost < left:
                    _sync(device)
                    start = time.perf_counter()
                    thunks[name]()
                    _sync(device)
                    cost += time.perf_counter() - start
            self.overrun_s += max(0.0, cost - left)
        for round_ in (names, names[::-1]):
            if best and len(best) == len(names) and max(best.values()) > DECISIVE * min(best.values()):
                break  # the first round decided it: no repeats
            for name in round_:
                free = first_is_call and not best
                # What this run may take: a candidate's first run, all that is left; a repeat,
                # REPEAT_ALLOWANCE x its first time (and only while that fits).
                allowed = left - cost if name not in best else REPEAT_ALLOWANCE * best[name]
                if not free and (allowed <= 0 or cost + allowed > left):
                    continue
                _sync(device)
                start = time.perf_counter()
                out = thunks[name]()
                _sync(device)
                seconds = time.perf_counter() - start
                if not free:
                    cost += seconds
                    self.overrun_s += max(0.0, seconds - allowed)
                best[name] = min(best.get(name, math.inf), seconds)
                if first_is_call and min(best, key=best.__getitem__) == name:
                    result, result_of = out, name
                del out
        self.spent[op.name] = self.spent.get(op.name, 0.0) + cost
        if not best:
            self._record(Choice(op.name, key, default, "default (budget spent)", flops=flops))
            return None
        fastest = min(best, key=lambda n: (best[n], names.index(n)))
        # Within TIE_MARGIN of the default is a tie (the noise of one timing): the default stays.
        winner = default if default in best and best[default] <= best[fastest] * (1 + TIE_MARGIN) else fastest
        complete = len(best) == len(names)  # otherwise the budget ran out: not worth keeping on disk
        choice = self._record(Choice(op.name, key, winner, "measured" if complete else "measured in part (budget)",
                                     dict(best), flops, cost))
        if complete:
            self._persist(choice)
        if not first_is_call:
            return None
        return result if result_of == winner else thunks[winner]()

    # ------------------------------------------------------------------ persistence
    def _persisted_choice(self, op: Op, key: str) -> Choice | None:
        path = cache_path()
        if path is None:
            return None
        if self._persisted is None:
            self._persisted = _read_cache(path).get(machine_key(), {})
        entry = self._persisted.get(f"{op.name} {key}")
        if not isinstance(entry, dict) or entry.get("winner") not in op.candidates:
            return None
        return self._record(Choice(op.name, key, entry["winner"], "persisted",
                                   {k: float(v) for k, v in entry.get("seconds", {}).items()}))

    def _persist(self, choice: Choice) -> None:
        path = cache_path()
        if path is None:
            return
        try:
            data = _read_cache(path)
            data.setdefault(machine_key(), {})[f"{choice.op} {choice.key}"] = {
                "winner": choice.winner, "seconds": choice.seconds}
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"version": _CACHE_VERSION, "machines": data}, indent=1))
            os.replace(tmp, path)
        except OSError:
            pass  # a read-only home: the choice stays for this process

    def report(self) -> list[dict[str, Any]]:
        return [c.as_dict() for c in self.choices.values()]

    def describe(self) -> list[str]:
        lines = [c.describe() for c in self.choices.values()]
        over = f", {self.overrun_s:.3f} s of it beyond the runs' allowance" if self.overrun_s else ""
        return lines + [f"kernel timing cost this process: {self.spent_s:.3f} s (budget {self.budget_s:.1f} s{over})"]


def _read_cache(path: Path) -> dict[str, dict]:
    """The file's per-machine tables; an unreadable or foreign file reads as empty."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != _CACHE_VERSION or not isinstance(data.get("machines"), dict):
        return {}
    return {k: v for k, v in data["machines"].items() if isinstance(v, dict)}


_CHOOSER = KernelChooser()


def chooser() -> KernelChooser:
    """This process's chooser."""
    return _CHOOSER
