"""ps3 serve against a real uvicorn server on 127.0.0.1 (a free port, stopped at the end of the
module): served outputs equal local calls, every error code from a real bad request, look-closer
sessions, the low-res cache, overload, and the server surviving all of it."""
import io
import re
import shutil
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
import torch
from golden import MODEL_DIR
from PIL import Image
from tolerances import assert_close_paths, assert_same_selection

import ps3
from ps3.serve import Client, ServeError, SessionLost
from ps3.serve.commands import ServeOptions, start_in_thread

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

CAPTIONS = ["a red circle", "a blue star", "a green square on grass"]


def png(h, w, seed, mode="RGB") -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The tiny fixture model with a tokenizer (prompts) and a keep-aspect processor (images of
    different shapes reach the encoder at different sizes, so batches are truly mixed)."""
    from ps3.train.model_setup import build_caption_tokenizer

    path = tmp_path_factory.mktemp("serve") / "model"
    shutil.copytree(MODEL_DIR, path)
    joint = ps3.PS3Model.from_pretrained(MODEL_DIR)
    build_caption_tokenizer(CAPTIONS, joint.config.text_config.context_length).save_pretrained(path)
    ps3.PS3ImageProcessor(image_size=224, resize_mode="keep_aspect", patch_size=14).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def server(model_dir):
    options = ServeOptions(max_batch=8, max_wait_ms=150, max_queue=8, cache_mb=64, max_upload_mb=0.25,
                           max_pixels=2**22)
    with start_in_thread(model_dir, options) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    with Client(server.url) as c:
        yield c


def metric(client, name: str) -> float:
    total = 0.0
    for line in client.metrics().splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def local(server, data: bytes, prompt=None, **kwargs):
    loaded = server.service.engine.loaded
    p = loaded.prompts([prompt]) if prompt is not None else None
    with torch.no_grad():
        return loaded.vision(loaded.pixel_values(data), prompt=p, **kwargs)


def assert_served_equals_local(served, want):
    assert served.last_hidden_state.shape == want.last_hidden_state.shape
    same = assert_same_selection(served.selection_maps, want.selection_maps, want.selection_probs)
    low = 16  # the fixture's low-res tokens
    n = None if same else low
    assert_close_paths(served.last_hidden_state[:, :n], want.last_hidden_state[:, :n], "last_hidden_state")


def concurrently(calls):
    results = [None] * len(calls)

    def run(i):
        try:
            results[i] = calls[i]()
        except Exception as exc:  # the caller asserts on it
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return results


REQUESTS = [  # (image (h, w, seed), arguments): looks, budgets, prompts, first-n, 'all'
    ((120, 200, 1), {"num_look_close": 1}),
    ((200, 120, 2), {"num_look_close": 2, "prompt": "a red circle"}),
    ((150, 150, 3), {"num_token_look_close": 30}),
    ((90, 240, 4), {"num_token_look_close": 100, "prompt": "a blue star"}),
    ((160, 100, 5), {"num_look_close": 1, "only_select_first_n_scale": 1}),
    ((130, 170, 6), {"num_look_close": "all"}),
    ((110, 110, 7), {}),
    ((140, 190, 8), {"num_look_close": 0}),
]


def test_concurrent_mixed_requests_equal_local_calls(server, client):
    images = [png(*spec) for spec, _ in REQUESTS]
    batches_before = metric(client, "ps3_serve_batch_size_count")
    served = concurrently([lambda d=d, kw=kw: client.encode(d, **kw) for d, (_, kw) in zip(images, REQUESTS)])
    batches = metric(client, "ps3_serve_batch_size_count") - batches_before
    assert batches < len(REQUESTS), "concurrent requests were not batched together"
    for data, (_, kwargs), out in zip(images, REQUESTS, served):
        assert not isinstance(out, Exception), out
        want = local(server, data, **({"num_look_close": 1} | kwargs) if not kwargs else kwargs)
        if want.selection_maps is None:
            assert out.selection_maps is None
            assert_close_paths(out.last_hidden_state, want.last_hidden_state, "low-res only")
        else:
            assert_served_equals_local(out, want)
        assert out.tokens == want.last_hidden_state.shape[1]
        assert out.dtype == "float32" and out.last_hidden_state.dtype == torch.float32
        assert tuple(out.image_size) == Image.open(io.BytesIO(data)).size[::-1]


def test_repeat_image_with_new_prompt_skips_the_low_res_pass(server, client):
    data = png(170, 130, 11)
    before = metric(client, "ps3_serve_low_res_images_total")
    hits = metric(client, "ps3_serve_cache_hits_total")
    first = client.encode(data, prompt="a red circle", num_token_look_close=40)
    assert metric(client, "ps3_serve_low_res_images_total") == before + 1
    second = client.encode(data, prompt="a green square on grass", num_token_look_close=40)
    third = client.encode(data, num_token_look_close=60)  # bottom-up, another budget
    assert metric(client, "ps3_serve_low_res_images_total") == before + 1  # no second low-res pass
    assert metric(client, "ps3_serve_cache_hits_total") == hits + 2
    # Never a result from another prompt or budget: each equals its own local call.
    assert_served_equals_local(first, local(server, data, "a red circle", num_token_look_close=40))
    assert_served_equals_local(second, local(server, data, "a green square on grass", num_token_look_close=40))
    assert_served_equals_local(third, local(server, data, num_token_look_close=60))
    assert metric(client, "ps3_serve_cache_bytes") > 0


@pytest.mark.parametrize("prompt", [None, "a blue star"])
def test_look_closer_encodes_new_cells_and_its_union_equals_one_call(server, client, prompt):
    data = png(180, 140, 21)
    first = client.encode(data, num_look_close=1, prompt=prompt, session=True)
    assert first.session
    passes = metric(client, "ps3_serve_low_res_images_total")
    seed = 22 if prompt is None else 32
    others = [png(120, 160, seed), png(200, 100, seed + 1)]  # new to the server
    batches = metric(client, "ps3_serve_batch_size_count")
    # The turn runs in one batch with fresh encodes (their low-res passes are the only ones run).
    turn, *encoded = concurrently([lambda: client.look_closer(first, num_look_close=1)] +
                                  [lambda d=d: client.encode(d, num_token_look_close=50) for d in others])
    assert metric(client, "ps3_serve_batch_size_count") - batches < 3
    assert metric(client, "ps3_serve_low_res_images_total") == passes + len(others)  # the session's pass reused
    for other, out in zip(others, encoded):
        assert_served_equals_local(out, local(server, other, num_token_look_close=50))
    for old, new in zip(first.selection_maps, turn.new_selection_maps):
        assert not (old.bool() & new.bool()).any(), "a cell was encoded twice"
    # Upstream's looks take the top cells not yet taken, so two one-look turns with one prompt
    # select what one two-look call selects, and each look's tokens attend only to the low-res
    # cache and themselves: the new tokens equal the two-look call's tokens at those cells.
    want = local(server, data, prompt, num_look_close=2)
    union = [a.bool() | b.bool() for a, b in zip(first.selection_maps, turn.new_selection_maps)]
    assert [torch.equal(u, m.bool()) for u, m in zip(turn.selection_maps, union)] == [True] * len(union)
    if assert_same_selection(union, want.selection_maps, want.selection_probs):
        vision = server.service.engine.vision
        want_maps = vision.format_features_into_feature_maps(want.last_hidden_state, want.selection_maps)
        got_maps = vision.format_features_into_feature_maps(turn.last_hidden_state, turn.new_selection_maps)
        for i, new in enumerate(turn.new_selection_maps):
            cells = new[0].bool()
            assert_close_paths(got_maps[i + 1][0][:, cells], want_maps[i + 1][0][:, cells], f"scale {i + 1}")
    assert turn.tokens == 16 + sum(int(m.sum()) for m in turn.new_selection_maps)


def post(server, path, data=None, files=None, **kwargs):
    return httpx.post(server.url + path, data=data, files=files, timeout=60, **kwargs)


BOMB = Image.new("L", (4000, 4000))  # 16 M pixels over the server's 4 M limit, a tiny PNG


def _bomb() -> bytes:
    buffer = io.BytesIO()
    BOMB.save(buffer, format="PNG")
    return buffer.getvalue()


BAD_REQUESTS = [
    ("garbage image", {}, {"image": ("x.jpg", b"\xff\xd8 not a jpeg")}, 400, "image"),
    ("truncated png", {}, {"image": ("x.png", png(64, 64, 1)[:200])}, 400, "image"),
    ("empty file", {}, {"image": ("x.png", b"")}, 400, "image"),
    ("no image", {"num_look_close": "1"}, None, 400, "image"),
    ("image as text", {"image": "hello"}, None, 400, "image"),
    ("looks not a number", {"num_look_close": "two"}, "ok", 400, "num_look_close"),
    ("negative tokens", {"num_token_look_close": "-5"}, "ok", 400, "num_token_look_close"),
    ("first-n out of range", {"only_select_first_n_scale": "7"}, "ok", 400, "only_select_first_n_scale"),
    ("unknown field", {"num_looks": "1"}, "ok", 400, "num_looks"),
    ("bad session flag", {"session": "maybe"}, "ok", 400, "session"),
    ("upload too large", {}, {"image": ("x.png", b"\0" * 300_000)}, 413, "limit"),
    ("decompression bomb", {}, {"image": ("bomb.png", _bomb())}, 413, "pixels"),
]


@pytest.mark.parametrize("name,data,files,status,names", BAD_REQUESTS, ids=[r[0] for r in BAD_REQUESTS])
def test_bad_requests_get_4xx_json_naming_the_field(server, name, data, files, status, names):
    if files == "ok":
        files = {"image": ("ok.png", png(64, 80, 3))}
    response = post(server, "/v1/encode", data=data, files=files)
    assert response.status_code == status, response.text
    assert names in response.json()["error"]


def test_other_bad_requests(server, client):
    response = httpx.post(server.url + "/v1/encode", content=b"{}", headers={"content-type": "application/json"})
    assert response.status_code == 400 and "image" in response.json()["error"]
    response = httpx.post(server.url + "/v1/encode", content=b"--x\r\nbroken",
                          headers={"content-type": "multipart/form-data; boundary=x"})
    assert response.status_code == 400 and "error" in response.json()
    assert httpx.get(server.url + "/v1/nothing").status_code == 404
    assert httpx.get(server.url + "/v1/encode").status_code == 405
    with pytest.raises(SessionLost) as lost:
        client.look_closer("no-such-session", num_look_close=1)
    assert lost.value.status == 404 and "session" in lost.value.message
    assert post(server, "/v1/look_closer", data={}).status_code == 400  # no session field
    assert metric(client, 'ps3_serve_requests_total{endpoint="encode",status="500"}') == 0
    assert httpx.get(server.url + "/healthz").status_code == 200


@pytest.fixture(scope="module")
def slow_server(model_dir):
    """One queue slot, jobs wait a second for company, requests time out after 0.4 s."""
    options = ServeOptions(max_batch=8, max_wait_ms=1000, max_queue=1, request_timeout_s=0.4)
    with start_in_thread(model_dir, options) as running:
        yield running


def test_overload_timeout_and_disconnect(slow_server):
    url, data = slow_server.url, png(64, 64, 5)
    files = {"image": ("a.png", data)}
    # 504: the job waits in the queue past the request timeout.
    response = httpx.post(url + "/v1/encode", files=files, timeout=30)
    assert response.status_code == 504 and "timeout" in response.json()["error"]
    # 503 with Retry-After while the only slot is held.
    holder = threading.Thread(target=lambda: httpx.post(url + "/v1/encode", files=files, timeout=30))
    holder.start()
    deadline = time.monotonic() + 5
    while slow_server.service.batcher.slots == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    busy = httpx.post(url + "/v1/encode", files=files, timeout=30)
    holder.join()
    assert busy.status_code == 503 and int(busy.headers["retry-after"]) >= 1 and "busy" in busy.json()["error"]
    # A client that disconnects gives its slot back (and its job leaves the queue).
    with pytest.raises(httpx.TimeoutException):
        httpx.post(url + "/v1/encode", files=files, timeout=0.15)
    deadline = time.monotonic() + 3
    while slow_server.service.batcher.slots and time.monotonic() < deadline:
        time.sleep(0.02)
    assert slow_server.service.batcher.slots == 0 and slow_server.service.batcher.waiting == 0
    assert httpx.get(url + "/healthz").status_code == 200


def test_overload_gives_503s_and_no_500s(server, client):
    data = [png(100 + 7 * i, 120, 40 + i) for i in range(20)]  # 20 at once for 8 slots
    statuses = concurrently([lambda d=d: post(server, "/v1/encode", files={"image": ("a.png", d)},
                                              data={"num_look_close": "1"}).status_code for d in data])
    assert set(statuses) <= {200, 503} and 503 in statuses and 200 in statuses, statuses
    assert client.health()
    assert client.encode(data[0]).last_hidden_state.shape[0] == 1


def _odd_images():
    tiny = io.BytesIO()
    Image.new("RGB", (1, 1), (9, 9, 9)).save(tiny, format="PNG")
    palette = io.BytesIO()
    Image.new("P", (50, 30), 3).save(palette, format="PNG", transparency=3)
    grey16 = io.BytesIO()
    Image.fromarray(np.full((40, 70), 40000, dtype=np.uint16)).save(grey16, format="TIFF")
    cmyk = io.BytesIO()
    Image.new("CMYK", (64, 48), (10, 200, 30, 0)).save(cmyk, format="JPEG")
    return [tiny.getvalue(), palette.getvalue(), grey16.getvalue(), cmyk.getvalue()]


def test_odd_but_valid_inputs_are_encoded(server, client):
    images = _odd_images()
    for data, fields in zip(images, [{"prompt": ""}, {"num_look_close": "all", "prompt": "zebra unknown words"},
                                     {"num_token_look_close": "0"}, {"num_look_close": "1000000"}]):
        response = post(server, "/v1/encode", data=fields, files={"image": ("odd", data)})
        assert response.status_code == 200, (fields, response.text)
    assert client.health()


def test_client_errors(server):
    with Client(server.url) as c:
        with pytest.raises(ServeError) as err:
            c.encode(b"not an image")
        assert err.value.status == 400
        with pytest.raises(TypeError, match="image must be"):
            c.encode(12)
        out = c.encode(Image.new("RGB", (90, 60), (200, 10, 10)))  # a PIL image travels as PNG
        assert out.image_size == (60, 90)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ps3_serve_command(model_dir):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "ps3.cli", "serve", str(model_dir), "--port", str(port),
                             "--max-wait-ms", "1"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            alive = proc.poll() is None
            assert alive and time.monotonic() < deadline, "no start" if alive else proc.stdout.read()
            time.sleep(0.1)
        with Client(url) as c:
            out = c.encode(png(100, 100, 9), num_look_close=1)
            assert out.model == str(model_dir) and out.last_hidden_state.shape[0] == 1
            assert re.search(r"ps3_serve_requests_total\{endpoint=\"encode\",status=\"200\"\} 1", c.metrics())
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.parametrize("args,flag", [(["NOTHING"], "--model"), (["MODEL", "--max-batch", "0"], "--max-batch"),
                                       (["MODEL", "--max-upload-mb", "0"], "--max-upload-mb"),
                                       (["MODEL", "--device", "tpu"], "--device")])
def test_ps3_serve_command_errors(model_dir, tmp_path, capsys, args, flag):
    from ps3.cli import main

    paths = {"NOTHING": str(tmp_path / "nothing"), "MODEL": str(model_dir)}
    assert main(["serve", *[paths.get(a, a) for a in args]]) == 2
    assert flag in capsys.readouterr().err


def test_session_store_bounds():
    import torch as _torch

    from ps3.serve.sessions import Session, SessionStore

    store = SessionStore(max_sessions=3, ttl_s=60, max_bytes=250)
    ids = [store.add(Session(("k", i), b"x" * 100, None, [_torch.zeros(1, 2, 2, dtype=_torch.bool)]))
           for i in range(3)]
    assert store.get(ids[0]) is None and store.get(ids[1]) is not None  # 300 bytes > 250: the oldest went
    assert store.bytes == 200 and len(store) == 2
    store.get(ids[1])  # now the most recently used
    more = [store.add(Session(("k", 9 + i), b"y", None, [])) for i in range(2)]
    assert store.get(ids[2]) is None and store.get(ids[1]) is not None and all(store.get(m) for m in more)


def test_look_closer_after_the_cache_dropped_the_image(model_dir):
    """With no cache, a turn decodes the session's copy of the upload and runs the low-res pass
    again: the same cells and tokens as with the cached pass."""
    with start_in_thread(model_dir, ServeOptions(cache_mb=0, max_wait_ms=1)) as bare, Client(bare.url) as c:
        data = png(150, 190, 51)
        first = c.encode(data, num_look_close=1, session=True)
        turn = c.look_closer(first.session, num_look_close=1, prompt="a red circle")
        assert metric(c, "ps3_serve_low_res_images_total") == 2 and metric(c, "ps3_serve_cache_entries") == 0
        loaded = bare.service.engine.loaded
        pixels = loaded.pixel_values(data)
        with torch.no_grad():
            want = loaded.vision(pixels, num_look_close=1, prompt=loaded.prompts(["a red circle"]),
                                 old_selection_maps=first.selection_maps)
        assert_served_equals_local(ps3.PS3VisionOutput(last_hidden_state=turn.last_hidden_state,
                                                       selection_maps=turn.new_selection_maps), want)
