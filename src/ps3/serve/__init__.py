"""``ps3 serve``: the PS3 encoder as an HTTP service with prompt-aware caching, look-closer
sessions and dynamic batching (``docs/serve.md``). The server needs ``pip install 'ps3[serve]'``
(FastAPI, uvicorn, prometheus_client, python-multipart); :class:`Client` needs only ``httpx``.
Nothing here is imported by the rest of ``ps3``."""
from __future__ import annotations

from .client import Client, ServeError, SessionLost
from .wire import ServedOutput

__all__ = ["Client", "ServeError", "ServedOutput", "SessionLost"]
