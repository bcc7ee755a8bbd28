"""``ps3.serve.Client``: the HTTP contract of ``ps3 serve`` from Python, returning outputs shaped
like a local call's (a :class:`ps3.PS3VisionOutput` with batch dimension 1)."""
from __future__ import annotations

import io
import os
from typing import Any

from .wire import ServedOutput, load_output


class ServeError(RuntimeError):
    """The server refused a request: ``status`` (400, 404, 413, 503, 504, …) and its message;
    ``retry_after`` (seconds) with a 503."""

    def __init__(self, status: int, message: str, retry_after: float | None = None):
        super().__init__(f"HTTP {status}: {message}")
        self.status, self.message, self.retry_after = status, message, retry_after


class SessionLost(ServeError, LookupError):
    """404 from look_closer: the session expired or its server restarted; encode the image again
    with ``session=True``."""


def _image_bytes(image: Any) -> tuple[str, bytes]:
    if isinstance(image, (str, os.PathLike)):
        with open(image, "rb") as f:
            return os.path.basename(os.fspath(image)), f.read()
    if isinstance(image, (bytes, bytearray, memoryview)):
        return "image", bytes(image)
    if hasattr(image, "save") and hasattr(image, "mode"):  # a PIL image: sent losslessly
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return "image.png", buffer.getvalue()
    if hasattr(image, "read"):
        return getattr(image, "name", "image"), image.read()
    raise TypeError(f"image must be a path, bytes, a binary file or a PIL image, got {type(image).__name__}")


def _fields(**values) -> dict[str, str]:
    return {k: str(v) for k, v in values.items() if v is not None}


class Client:
    """``Client("http://host:8000").encode("photo.jpg", num_look_close=2, prompt="a red boat")``.

    Outputs are :class:`ps3.serve.wire.ServedOutput` (a ``PS3VisionOutput``): ``last_hidden_state``
    (1, N, C), ``selection_maps``, and ``session`` / ``tokens`` / ``model`` / ``dtype`` /
    ``image_size`` from the response. Refusals raise :class:`ServeError` (:class:`SessionLost` for
    an unknown session)."""

    def __init__(self, url: str, timeout: float = 120.0):
        import httpx

        self.url = url.rstrip("/")
        self._http = httpx.Client(base_url=self.url, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _post(self, path: str, data: dict[str, str], files=None) -> ServedOutput:
        response = self._http.post(path, data=data, files=files)
        if response.status_code != 200:
            try:
                message = response.json().get("error", response.text)
            except ValueError:
                message = response.text
            retry = response.headers.get("retry-after")
            kind = SessionLost if response.status_code == 404 and path.endswith("look_closer") else ServeError
            raise kind(response.status_code, message, float(retry) if retry else None)
        return load_output(response.content)

    def encode(self, image: Any, *, num_look_close: int | str | None = None, num_token_look_close: int | None = None,
               prompt: str | None = None, only_select_first_n_scale: int | None = None,
               session: bool = False) -> ServedOutput:
        """Encode one image (a path, bytes, a binary file or a PIL image). ``session=True`` keeps
        its state on the server for :meth:`look_closer` (the id is ``output.session``)."""
        name, data = _image_bytes(image)
        fields = _fields(num_look_close=num_look_close, num_token_look_close=num_token_look_close, prompt=prompt,
                         only_select_first_n_scale=only_select_first_n_scale, session=1 if session else None)
        return self._post("/v1/encode", fields, files={"image": (name, data, "application/octet-stream")})

    def look_closer(self, session: str | ServedOutput, *, num_look_close: int | str | None = None,
                    num_token_look_close: int | None = None, prompt: str | None = None,
                    only_select_first_n_scale: int | None = None) -> ServedOutput:
        """Encode more of a session's image: only cells no earlier turn encoded. The output's
        ``last_hidden_state`` holds the low-res tokens and the new cells' tokens
        (``new_selection_maps``); ``selection_maps`` is every cell encoded so far."""
        sid = session.session if isinstance(session, ServedOutput) else session
        if not sid:
            raise ValueError("session must be a session id or an output of encode(..., session=True)")
        fields = _fields(session=sid, num_look_close=num_look_close, num_token_look_close=num_token_look_close,
                         prompt=prompt, only_select_first_n_scale=only_select_first_n_scale)
        return self._post("/v1/look_closer", fields)

    def health(self) -> bool:
        return self._http.get("/healthz").status_code == 200

    def metrics(self) -> str:
        return self._http.get("/metrics").text
