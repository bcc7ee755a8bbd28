"""Look-closer sessions: what the server remembers about an image between turns.

A session holds the uploaded file (so the image can be decoded again if its low-res pass has
left the cache), the prompt text of the last turn and the union of the cells encoded so far.
Sessions are disposable by design: they expire after ``ttl_s`` idle seconds, the least recently
used go when more than ``max_sessions`` exist or their uploads hold more than ``max_bytes``, and a
restart loses them all; a lost session answers 404 and
the client encodes the image again.
"""
from __future__ import annotations

import asyncio
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch


@dataclass
class Session:
    key: tuple  # the low-res cache key of the image
    data: bytes  # the uploaded file
    prompt: str | None  # the last turn's prompt text (None: bottom-up)
    maps: list[torch.Tensor]  # per high-res scale, (1, h_i, w_i) bool: cells encoded so far
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one turn at a time
    used: float = field(default_factory=time.monotonic)


class SessionStore:
    def __init__(self, max_sessions: int = 1024, ttl_s: float = 900.0, max_bytes: int = 1 << 30):
        if max_sessions < 0 or ttl_s <= 0 or max_bytes < 0:
            raise ValueError(f"max_sessions and max_bytes must be >= 0 and ttl_s > 0, got {max_sessions}, "
                             f"{max_bytes} and {ttl_s}")
        self.max_sessions = max_sessions
        self.ttl_s = ttl_s
        self.max_bytes = max_bytes
        self.bytes = 0
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._sessions)

    def _expire(self, now: float) -> None:
        while self._sessions:
            sid, oldest = next(iter(self._sessions.items()))
            if (now - oldest.used <= self.ttl_s and len(self._sessions) <= self.max_sessions
                    and self.bytes <= self.max_bytes):
                break
            del self._sessions[sid]
            self.bytes -= len(oldest.data)

    def add(self, session: Session) -> str:
        sid = secrets.token_urlsafe(16)
        with self._lock:
            self._sessions[sid] = session
            self.bytes += len(session.data)
            self._expire(time.monotonic())
        return sid

    def get(self, sid: str) -> Session | None:
        with self._lock:
            now = time.monotonic()
            self._expire(now)
            session = self._sessions.get(sid)
            if session is not None:
                session.used = now
                self._sessions.move_to_end(sid)
            return session
