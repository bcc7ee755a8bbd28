"""``ps3 serve MODEL``: build the service for a model and run it under uvicorn; also
:func:`start_in_thread`, a real server on a free loopback port for tests and benchmarks."""
from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass

from ..images import MAX_IMAGE_PIXELS
from ..runtime import DTYPE_NAMES, UserError, user_input

EXTRA_HINT = "ps3 serve needs the serve extra: pip install 'ps3[serve]'"


def _require_serve_deps() -> None:
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import python_multipart  # noqa: F401  (form uploads)
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise UserError(f"{EXTRA_HINT} ({exc})") from exc


@dataclass
class ServeOptions:
    device: str = "cpu"
    dtype: str | None = None
    max_batch: int = 8
    max_wait_ms: float = 10.0
    max_queue: int = 64
    cache_mb: float = 1024.0
    max_upload_mb: float = 64.0
    max_pixels: int = MAX_IMAGE_PIXELS
    request_timeout_s: float = 60.0
    max_sessions: int = 1024
    session_ttl_s: float = 900.0
    session_mb: float = 1024.0


def build_app(model, options: ServeOptions | None = None, model_name: str | None = None):
    """A FastAPI app serving ``model`` (a name, hub id or directory, loaded like ``ps3 encode``, or
    an already loaded :class:`ps3.runtime.LoadedModel`). Returns (app, service)."""
    _require_serve_deps()
    from ..hub import resolve_model_dir
    from ..runtime import LoadedModel, load_model, parse_device
    from .app import Limits, Service, create_app
    from .batcher import Batcher
    from .cache import LowResCache
    from .engine import Engine
    from .metrics import Metrics
    from .sessions import SessionStore

    o = options or ServeOptions()
    for name, value in (("max_upload_mb", o.max_upload_mb), ("request_timeout_s", o.request_timeout_s),
                        ("max_pixels", o.max_pixels)):
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")
    if o.cache_mb < 0:
        raise ValueError(f"cache_mb must be >= 0, got {o.cache_mb}")
    if isinstance(model, LoadedModel):
        loaded, name = model, model_name or str(model.directory)
    else:
        directory = resolve_model_dir(model)
        text = (directory / "tokenizer_config.json").is_file()
        loaded = load_model(directory, device=parse_device(o.device), dtype=o.dtype, text=text)
        name = model_name or str(model)
    loaded.vision.eval()
    if loaded.text is not None:
        loaded.text.eval()
    metrics = Metrics()
    engine = Engine(loaded, name, LowResCache(int(o.cache_mb * 2**20)), o.max_pixels)
    batcher = Batcher(engine, o.max_batch, o.max_wait_ms / 1000, o.max_queue, on_batch=metrics.batch_size.observe)
    sessions = SessionStore(o.max_sessions, o.session_ttl_s, int(o.session_mb * 2**20))
    metrics.attach(engine, batcher, sessions)
    service = Service(engine, batcher, sessions, Limits(int(o.max_upload_mb * 2**20), o.request_timeout_s), metrics)
    return create_app(service), service


class RunningServer:
    """A uvicorn server in a daemon thread; ``stop()`` (or leaving the ``with`` block) ends it."""

    def __init__(self, app, service, host: str = "127.0.0.1", port: int = 0):
        import uvicorn

        self.service = service
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self.url = f"http://{host}:{self._sock.getsockname()[1]}"
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5, lifespan="off")
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]}, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=15)
        self.service.batcher.stop()
        self._sock.close()

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_in_thread(model, options: ServeOptions | None = None, host: str = "127.0.0.1") -> RunningServer:
    """Serve ``model`` on a free port of ``host`` from this process (tests, benchmarks)."""
    app, service = build_app(model, options)
    return RunningServer(app, service, host)


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve a PS3 encoder over HTTP (needs ps3[serve])",
                       description="Serve a PS3 vision encoder: POST /v1/encode, POST /v1/look_closer, GET /healthz, "
                                   "GET /metrics (see docs/serve.md). Requests arriving together run as one batch; "
                                   "each image's low-res pass is cached for new prompts and look-closer turns.")
    p.add_argument("model", help="model directory (config.json + model.safetensors) or hub id")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (one server process per device)")
    p.add_argument("--dtype", choices=DTYPE_NAMES, help="default float32 on a CPU, bfloat16 on a GPU")
    p.add_argument("--max-batch", type=int, default=8, help="requests per encoder call, at most")
    p.add_argument("--max-wait-ms", type=float, default=10.0, help="how long a request waits for others to batch with")
    p.add_argument("--max-queue", type=int, default=64, help="requests admitted at once; more get 503")
    p.add_argument("--cache-mb", type=float, default=1024.0, help="memory for cached low-res passes (0: no cache)")
    p.add_argument("--max-upload-mb", type=float, default=64.0, help="largest upload accepted (413 above)")
    p.add_argument("--max-pixels", type=int, default=MAX_IMAGE_PIXELS,
                   help="largest image (width x height) decoded; more is refused with 413 before decoding")
    p.add_argument("--request-timeout-s", type=float, default=60.0, help="a request waiting longer gets 504")
    p.add_argument("--max-sessions", type=int, default=1024, help="look-closer sessions kept (oldest dropped)")
    p.add_argument("--session-ttl-s", type=float, default=900.0, help="idle seconds before a session expires")
    p.add_argument("--session-mb", type=float, default=1024.0,
                   help="memory for the sessions' copies of their uploads (least recently used dropped)")
    p.set_defaults(func=_run_serve)


def _run_serve(args) -> int:
    _require_serve_deps()
    import uvicorn

    from ..runtime import parse_device, parse_dtype

    if not 0 <= args.port < 65536:
        raise UserError(f"--port must be 0..65535, got {args.port}")
    for flag, value, low, strict in (("--max-batch", args.max_batch, 1, False),
                                     ("--max-queue", args.max_queue, 1, False),
                                     ("--max-wait-ms", args.max_wait_ms, 0, False),
                                     ("--cache-mb", args.cache_mb, 0, False),
                                     ("--max-upload-mb", args.max_upload_mb, 0, True),
                                     ("--max-pixels", args.max_pixels, 0, True),
                                     ("--request-timeout-s", args.request_timeout_s, 0, True),
                                     ("--max-sessions", args.max_sessions, 0, False),
                                     ("--session-ttl-s", args.session_ttl_s, 0, True),
                                     ("--session-mb", args.session_mb, 0, False)):
        if value < low or (strict and value == low):
            raise UserError(f"{flag} must be {'>' if strict else '>='} {low}, got {value}")
    with user_input("--device"):
        device = parse_device(args.device)
    dtype = args.dtype or str(parse_dtype(None, device)).replace("torch.", "")
    options = ServeOptions(device=args.device, dtype=dtype, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                           max_queue=args.max_queue, cache_mb=args.cache_mb, max_upload_mb=args.max_upload_mb,
                           max_pixels=args.max_pixels, request_timeout_s=args.request_timeout_s,
                           max_sessions=args.max_sessions, session_ttl_s=args.session_ttl_s,
                           session_mb=args.session_mb)
    with user_input("--model"):
        app, service = build_app(args.model, options)
    print(f"ps3 serve: {args.model} ({service.engine.dtype_name}, {device}) on http://{args.host}:{args.port}",
          flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning", lifespan="off",
                    timeout_graceful_shutdown=10)
    finally:
        service.batcher.stop()
    return 0
