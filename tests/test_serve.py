"""The server (m2sa_jax.inference + ``python -m m2sa_jax.serve``) on a tiny converted M²SA.

In process, through FastAPI's test client: the fixed-shape engine equals ``predictor.segment``,
nothing compiles after start-up whatever the image sizes and question lengths, every endpoint,
and every refusal of the "limits, bad input, security" list, each followed by a good request.
Then a real server in a subprocess on a loopback port, queried over HTTP and driven by headless
Chromium (Debian's, through Playwright), stopped by its pid.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import zipfile

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from skimage import data

import m2sa_jax
from checkpoints_convert.__main__ import main as convert_main
from m2sa_jax.inference.engine import CompileCounter
from m2sa_jax.inference.server import create_app
from m2sa_jax.inference.service import ServeSettings, Service, find_examples
from m2sa_jax.models import sam as sam_lib
from tests.support.m2sa_helpers import write_tiny_m2sa_folder
from tests.support.serve_helpers import write_answering_model

QUESTION = "Which parts would you hold to carry the cup?"
ANSWER = "the handle [SEG] and the cup [SEG]."
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def _photo():
    return np.ascontiguousarray(data.coffee()[::2, ::2])           # 200×300 real photo


def _cat():
    return np.ascontiguousarray(data.chelsea()[50:250, 75:375])      # 200×300 cat


def _png(rgb) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The tiny model (answering ANSWER to two image/question pairs), a photo, a synthetic
    MMR-format val split for the page's examples."""
    tmp = tmp_path_factory.mktemp("serve")
    write_tiny_m2sa_folder(str(tmp / "hf"), "m2sa", sam_depth=4, global_attn=(1, 3), img_size=256)
    assert convert_main(["m2sa", "--src", str(tmp / "hf"), "--dst", str(tmp / "random")]) == 0
    write_answering_model(str(tmp / "random"), str(tmp / "model"),
                          [(_photo(), QUESTION), (_cat(), "Where is the cup?")], ANSWER)
    Image.fromarray(_photo()).save(tmp / "coffee.jpg", quality=92)
    from m2sa_jax.data import synthetic
    synthetic.write_split(str(tmp / "synthetic"), "val", 3, seed=0)
    return dict(model=str(tmp / "model"), photo=str(tmp / "coffee.jpg"),
                synthetic=str(tmp / "synthetic"), tmp=tmp)


SETTINGS = dict(max_batch=4, batch_window_ms=20, max_queue=6, timeout_s=60, max_prompt_tokens=192,
                max_body_bytes=3 * 2**20, max_image_pixels=1_000_000, max_items_per_request=6)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(checkpoint: str, log, *args: str) -> dict:
    """``python -m m2sa_jax.serve --checkpoint ...`` on a free loopback port, output to ``log``."""
    port = _free_port()
    cmd = [sys.executable, "-m", "m2sa_jax.serve", "--checkpoint", checkpoint,
           "--port", str(port), *args, "--log-level", "warning"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    return dict(url=f"http://127.0.0.1:{port}", proc=proc, log=log)


def _wait_ready(started: dict, seconds: float) -> dict:
    """Polls /api/health until it answers 200; fails with the server's log if the process
    exits or ``seconds`` pass."""
    import httpx

    proc, log, url = started["proc"], started["log"], started["url"]
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        try:
            if httpx.get(url + "/api/health", timeout=2).status_code == 200:
                return started
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    pytest.fail(f"server not ready in {seconds:.0f} s:\n" + log.read_text())


def _stop(started: dict) -> None:
    proc = started["proc"]
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server_process(files, tmp_path_factory):
    """The server on the tiny model, started as soon as the model exists so that its
    compilation overlaps the in-process tests (XLA compiles on one core)."""
    log = tmp_path_factory.mktemp("server") / "server.log"
    started = _start_server(files["model"], log, "--examples", files["synthetic"],
                            "--max-batch", "2", "--row-buckets", "2", "--max-new-tokens", "12",
                            "--max-prompt-tokens", "128")
    yield started
    _stop(started)


@pytest.fixture(scope="module")
def server(server_process):
    return _wait_ready(server_process, 300)


@pytest.fixture(scope="module")
def service(files, server_process):
    predictor = m2sa_jax.load(files["model"], max_new_tokens=12)
    examples, _ = find_examples(files["model"], files["synthetic"])
    svc = Service(predictor, ServeSettings(**SETTINGS), name="tiny", examples=examples,
                  toy_model=True)
    return svc


@pytest.fixture(scope="module")
def client(service):
    from fastapi.testclient import TestClient

    with TestClient(create_app(service)) as c:
        assert service.wait_ready(300), service.error
        yield c


def _segment(client, image_bytes, question=QUESTION, **fields):
    return client.post("/api/segment", files={"image": ("x.png", image_bytes, "image/png")},
                       data={"question": question, **fields})


def _still_serving(client):
    assert client.get("/api/health").json()["status"] == "ok"
    r = _segment(client, _png(_photo()))
    assert r.status_code == 200 and r.json()["labels"] == ["the handle", "the cup"]


# --- numerics and compilation ------------------------------------------------------------------

def test_host_resize_equals_device_resize():
    x = np.random.default_rng(0).normal(size=(3, 64, 64)).astype(np.float32) * 5
    for resized, original in [((256, 171), (300, 200)), ((144, 256), (90, 160)),
                              ((256, 256), (700, 700)), ((256, 11), (1200, 50)), ((1, 256), (1, 300))]:
        device = np.asarray(sam_lib.postprocess_masks(x, resized, original, img_size=256))
        host = sam_lib.postprocess_masks_host(x, resized, original, img_size=256)
        assert host.shape == device.shape == (3,) + original
        np.testing.assert_allclose(host, device, atol=1e-5, rtol=0)


def test_engine_equals_predictor_segment(client, service):
    engine, predictor = service.engine, service.predictor
    photo, cat = _photo(), _cat()
    items = [engine.prepare(photo, QUESTION), engine.prepare(cat, "Where is the cup?")]
    results = engine.run(items)
    assert [r.answer.count("[SEG]") for r in results] == [2, 2]
    for it, r in zip(items, results):
        single = predictor.segment(it.image, it.question, return_logits=True)
        assert r.answer == single.answer and r.labels == single.labels
        assert r.mask_logits.shape == single.mask_logits.shape
        if len(r.labels):
            err = np.abs(r.mask_logits - single.mask_logits).max()
            print(f"\nengine vs predictor.segment, {r.mask_logits.shape}: max |Δlogit| {err:.1e}")
            assert err <= 1e-4
            sure = np.abs(single.mask_logits) >= 1e-3
            assert np.array_equal(r.masks[sure], single.masks[sure])


def test_nothing_compiles_after_startup(client, service):
    engine = service.engine
    assert engine.prompt_buckets == (128, 192) and engine.row_buckets == (1, 4)
    before = CompileCounter.count()
    sizes = [(1, 1), (33, 47), (200, 300), (480, 640), (1000, 37), (77, 999)]
    rng = np.random.default_rng(1)
    questions = ["?", QUESTION, "Where is the cup " + "and the saucer " * 8 + "?"]
    prompt_lengths, batch_sizes = set(), set()
    for k, (h, w) in enumerate(sizes):
        rgb = rng.integers(0, 255, (h, w, 3), np.uint8)
        batch = [engine.prepare(rgb if j % 2 else _photo(), questions[(k + j) % 3])
                 for j in range(1 + k % engine.rows)]
        prompt_lengths.add(max(engine.bucket_of(it) for it in batch))
        batch_sizes.add(len(batch))
        results = engine.run(batch)
        assert [r.mask_logits.shape[1:] for r in results] == [it.image.shape[:2] for it in batch]
    r = client.post("/api/segment_batch", files=[("image", ("a.png", _png(_cat()), "image/png"))],
                    data={"question": questions, "masks": "png"})
    assert r.status_code == 200
    assert prompt_lengths == {128, 192} and batch_sizes == {1, 2, 3, 4}   # every bucket ran
    assert CompileCounter.count() == before, "a request compiled (see jax_log_compiles)"


# --- the endpoints ---------------------------------------------------------------------------------

def test_segment_returns_rle_masks_equal_to_the_predictor(client, service):
    r = _segment(client, _png(_photo()))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["answer"].startswith("the handle [SEG] and the cup [SEG]")
    assert body["labels"] == ["the handle", "the cup"]
    assert (body["height"], body["width"]) == (200, 300)
    assert set(body["timings"]) == {"queue_ms", "model_ms", "total_ms", "batch_size"}
    expected = service.predictor.segment(_photo(), QUESTION).masks
    for m, want in zip(body["masks"], expected):
        rle = {"size": m["rle"]["size"], "counts": m["rle"]["counts"].encode()}
        got = mask_utils.decode(rle).astype(bool)
        assert np.array_equal(got, want) and m["area"] == int(want.sum())
        assert len(m["bbox"]) == 4


def test_segment_png_and_none_masks(client):
    r = _segment(client, _png(_photo()), masks="png", max_new_tokens="3")
    assert r.status_code == 200, r.text
    body = r.json()
    assert ANSWER.startswith(body["answer"]) and body["masks"] == []   # cut before the [SEG]
    assert body["no_target"] is True and body["labels"] == []
    r = _segment(client, _png(_photo()), masks="png")
    pngs = [np.asarray(Image.open(io.BytesIO(base64.b64decode(m["png"])))) for m in r.json()["masks"]]
    assert len(pngs) == 2 and pngs[0].shape == (200, 300)
    r = _segment(client, _png(_photo()), masks="none")
    assert r.json()["masks"] == [] and r.json()["labels"] == ["the handle", "the cup"]
    assert r.json()["no_target"] is False                   # masks left out, not absent
    r = _segment(client, _png(_photo()), masks="bmp")
    assert r.status_code == 422 and "rle, png, none" in r.json()["error"]


def test_segment_batch(client):
    photo, cat = _png(_photo()), _png(_cat())
    one_image = client.post("/api/segment_batch", files=[("image", ("p.png", photo, "image/png"))],
                            data={"question": [QUESTION, "Where is the saucer?"]})
    assert one_image.status_code == 200
    res = one_image.json()["results"]
    assert [x["question"] for x in res] == [QUESTION, "Where is the saucer?"]
    assert res[0]["timings"]["batch_size"] == 2
    pairs = client.post("/api/segment_batch",
                        files=[("image", ("p.png", photo, "image/png")),
                               ("image", ("c.png", cat, "image/png"))],
                        data={"question": [QUESTION, "Where is the cup?"]})
    res = pairs.json()["results"]
    assert [(x["height"], x["width"]) for x in res] == [(200, 300), (200, 300)]
    assert res[1]["labels"] == ["the handle", "the cup"]
    mismatch = client.post("/api/segment_batch",
                           files=[("image", ("p.png", photo, "image/png")),
                                  ("image", ("c.png", cat, "image/png"))],
                           data={"question": ["a?", "b?", "c?"]})
    assert mismatch.status_code == 422 and "one per question" in mismatch.json()["error"]
    too_many = client.post("/api/segment_batch", files=[("image", ("p.png", photo, "image/png"))],
                           data={"question": ["q?"] * 7})
    assert too_many.status_code == 413 and "limit of 6" in too_many.json()["error"]


def test_requests_arriving_together_share_a_batch(client, service):
    engine = service.engine
    first = service.batcher.submit([engine.prepare(_photo(), QUESTION)])
    long_question = "Where is the cup " + "and the saucer " * 8 + "?"
    with engine.lock:                                       # the worker waits on this batch
        time.sleep(0.3)
        later = service.batcher.submit([engine.prepare(_cat(), "Where is the cup?"),
                                        engine.prepare(_photo(), long_question),
                                        engine.prepare(_photo(), "Where is the saucer?"),
                                        engine.prepare(_photo(), QUESTION)])
    assert [engine.bucket_of(e.item) for e in later] == [128, 192, 128, 128]
    done = service.batcher.wait(first + later, timeout_s=60)
    # the three short questions share a batch; the long one (another bucket) runs on its own
    assert [r.timings["batch_size"] for r, _ in done] == [1, 3, 1, 3, 3]


def test_health_model_and_openapi(client):
    health = client.get("/api/health").json()
    assert health["status"] == "ok" and set(health["warmup_seconds"]) >= {"encode", "masks"}
    info = client.get("/api/model").json()
    assert info["kind"] == "M²SA" and info["variant"] == "m2sa"
    assert info["dtype"]["params"] == ["float32"]
    assert info["parameters"] == 5_625_328 and info["toy_model"] is True
    assert info["batching"]["prompt_buckets"] == [128, 192]
    spec = client.get("/openapi.json").json()
    for path in ("/api/segment", "/api/segment_batch", "/api/health", "/api/model"):
        assert path in spec["paths"]
    body = spec["paths"]["/api/segment"]["post"]["requestBody"]["content"]
    assert set(body["multipart/form-data"]["schema"]["properties"]) >= {"image", "question"}
    assert client.get("/docs").status_code == 200


def test_page_config_has_notice_and_examples(client, service):
    config = client.get("/config").text
    assert "A toy model." in config
    assert all(e.question.split(",")[0] in config for e in service.examples)
    assert len(service.examples) == 3
    assert client.get("/").status_code == 200


# --- limits, bad input, security (one test each) ------------------------------------------------

def test_non_image_upload(client):
    r = client.post("/api/segment", files={"image": ("notes.txt", b"just some text", "text/plain")},
                    data={"question": QUESTION})
    assert r.status_code == 400 and "not an image" in r.json()["error"]
    assert "notes.txt" in r.json()["error"]
    _still_serving(client)


def test_corrupt_image(client):
    r = _segment(client, b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 40)
    assert r.status_code == 400 and "x.png" in r.json()["error"]
    _still_serving(client)


def test_truncated_image(client):
    buf = io.BytesIO()
    Image.fromarray(_photo()).save(buf, format="JPEG", quality=95)
    r = _segment(client, buf.getvalue()[: len(buf.getvalue()) // 2])
    assert r.status_code == 400 and "truncated or corrupt" in r.json()["error"]
    _still_serving(client)


def test_image_above_pixel_limit(client):
    r = _segment(client, _png(np.zeros((1001, 1000, 3), np.uint8)))      # 1.001 MP > 1 MP
    assert r.status_code == 413
    assert "1000×1001" in r.json()["error"] and "smaller image" in r.json()["error"]
    _still_serving(client)


def test_empty_question(client):
    r = _segment(client, _png(_photo()), question="   ")
    assert r.status_code == 422 and "empty" in r.json()["error"]
    _still_serving(client)


def test_over_long_question(client):
    r = _segment(client, _png(_photo()), question="where is the cup " * 40)      # 680 chars
    assert r.status_code == 422 and "too long" in r.json()["error"]
    assert "up to 192" in r.json()["error"]
    r = _segment(client, _png(_photo()), question="x" * 2001)
    assert r.status_code == 422 and "limit of 2000" in r.json()["error"]
    _still_serving(client)


def test_wrong_content_type(client):
    r = client.post("/api/segment", json={"image": "x", "question": QUESTION})
    assert r.status_code == 415 and "multipart/form-data" in r.json()["error"]
    r = client.post("/api/segment", data={"question": QUESTION})          # urlencoded form
    assert r.status_code == 415
    _still_serving(client)


def test_body_above_size_limit(client):
    big = os.urandom(3 * 2**20 + 10)
    r = _segment(client, big)                                             # Content-Length
    assert r.status_code == 413 and "limit of 3 MiB" in r.json()["error"]

    def chunks():                                                         # no Content-Length
        yield b"--b\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n\r\n"
        for _ in range(4):
            yield os.urandom(2**20)
    r = client.post("/api/segment", content=chunks(),
                    headers={"content-type": "multipart/form-data; boundary=b"})
    assert r.status_code == 413
    _still_serving(client)


def test_full_queue_answers_503_with_retry_after(client, service):
    engine, batcher = service.engine, service.batcher
    item = engine.prepare(_photo(), QUESTION)
    waiting = []
    with engine.lock:
        waiting += batcher.submit([item])
        time.sleep(0.2)                                     # the worker holds it, blocked
        while batcher.pending() < batcher.max_queue:
            waiting += batcher.submit([item])
        r = _segment(client, _png(_photo()))
        assert r.status_code == 503 and "queue is full" in r.json()["error"]
        assert int(r.headers["Retry-After"]) >= 1
    batcher.wait(waiting, timeout_s=120)
    _still_serving(client)


def test_request_timeout(client, service):
    engine = service.engine
    service.settings.timeout_s = 0.5
    try:
        with engine.lock:
            t0 = time.perf_counter()
            r = _segment(client, _png(_photo()))
            assert r.status_code == 504 and "no answer within 0.5 s" in r.json()["error"]
            assert time.perf_counter() - t0 < 10
    finally:
        service.settings.timeout_s = SETTINGS["timeout_s"]
    _still_serving(client)


def test_binds_loopback_unless_told(monkeypatch):
    from m2sa_jax.serve import parse_args

    monkeypatch.delenv("M2SA_API_KEY", raising=False)
    args = parse_args([])
    assert args.host == "127.0.0.1" and args.api_key is None
    assert args.checkpoint == "outputs/synthetic"
    assert parse_args(["--host", "0.0.0.0"]).host == "0.0.0.0"


def test_api_key(client, service, monkeypatch):
    from m2sa_jax.serve import parse_args

    monkeypatch.setenv("M2SA_API_KEY", "from-env")
    assert parse_args([]).api_key == "from-env"
    service.settings.api_key = "s3cret"
    try:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            for r in (client.get("/api/health", headers=headers),
                      client.post("/api/segment", headers=headers,
                                  files={"image": ("x.png", _png(_photo()), "image/png")},
                                  data={"question": QUESTION})):
                assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer"
                assert "Authorization: Bearer" in r.json()["error"]
        ok = client.post("/api/segment", headers={"Authorization": "Bearer s3cret"},
                         files={"image": ("x.png", _png(_photo()), "image/png")},
                         data={"question": QUESTION})
        assert ok.status_code == 200
    finally:
        service.settings.api_key = None
    _still_serving(client)


def test_uploads_stay_in_memory_or_private_folder(client, service):
    mode = stat.S_IMODE(os.stat(service.temp_dir).st_mode)
    assert mode == 0o700
    import gradio.utils

    assert gradio.utils.get_upload_folder().startswith(service.temp_dir + os.sep)
    noisy = np.random.default_rng(0).integers(0, 255, (700, 700, 3), np.uint8)
    upload = _png(noisy)
    assert len(upload) > 1.2 * 2**20                        # above starlette's 1 MiB spool
    saved = tempfile.tempdir
    tempfile.tempdir = "/nonexistent-m2sa-test"             # any temp file would fail now
    try:
        r = _segment(client, upload)
    finally:
        tempfile.tempdir = saved
    assert r.status_code == 200 and (r.json()["height"], r.json()["width"]) == (700, 700)


def test_no_parameter_names_a_server_path(client):
    r = client.post("/api/segment", data={"image": "/etc/passwd", "question": QUESTION},
                    files={"unused": ("u.txt", b"u", "text/plain")})
    assert r.status_code == 400 and "never opens a file by name" in r.json()["error"]
    r = client.get("/gradio_api/file=/etc/passwd")
    assert r.status_code in (403, 404) and "root:" not in r.text
    _still_serving(client)


def test_examples_from_a_training_run_config(files, tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "config.json").write_text(json.dumps(
        {"data": {"kind": "synthetic", "root": files["synthetic"]}}))
    examples, toy = find_examples(str(workdir))
    assert toy and len(examples) == 3
    for path, question in examples:
        assert os.path.isfile(path) and question.strip()
    assert find_examples(str(tmp_path)) == ([], False)


# --- a real server: loopback HTTP and headless Chromium ------------------------------------------

def test_real_server_over_loopback(server, files):
    import httpx

    url = server["url"]
    results = []

    def ask(rgb, question):
        r = httpx.post(url + "/api/segment", files={"image": ("i.png", _png(rgb), "image/png")},
                       data={"question": question}, timeout=60)
        results.append(r)

    rng = np.random.default_rng(2)
    images = [_photo(), _cat(), rng.integers(0, 255, (50, 333, 3), np.uint8),
              rng.integers(0, 255, (401, 64, 3), np.uint8)]
    threads = [threading.Thread(target=ask, args=(im, QUESTION if k % 2 == 0 else "Where?"))
               for k, im in enumerate(images)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r.status_code for r in results) == [200] * 4
    shapes = sorted((r.json()["height"], r.json()["width"]) for r in results)
    assert shapes == sorted(im.shape[:2] for im in images)
    bad = httpx.post(url + "/api/segment", files={"image": ("t.txt", b"text", "text/plain")},
                     data={"question": "q"}, timeout=30)
    assert bad.status_code == 400
    health = httpx.get(url + "/api/health", timeout=10).json()
    assert health["status"] == "ok" and health["compiles_since_ready"] == 0
    assert f"on {url}/" in server["log"].read_text()               # bound to loopback


def _launch_chromium(playwright, profile):
    return playwright.chromium.launch_persistent_context(
        str(profile), executable_path=CHROMIUM, headless=True, viewport={"width": 1280, "height": 900},
        args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync"])


def test_page_in_headless_chromium(server, files, tmp_path):
    if not os.path.exists(CHROMIUM):
        if os.environ.get("CI"):
            pytest.fail("chromium is missing: scripts/setup.sh installs it (apt-get install chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = _launch_chromium(p, tmp_path / "profile")
        page = browser.new_page()
        page.goto(server["url"] + "/")
        page.wait_for_selector("#submit", timeout=60_000)
        assert page.locator("text=Examples (images and questions from the val split)").count() == 1
        page.click("#submit")                                # no image yet: a message, no trace
        toast = page.get_by_test_id("toast-body")
        toast.get_by_text("Upload an image (or pick an example) first.").wait_for(timeout=30_000)
        assert "Traceback" not in toast.inner_text()
        page.get_by_test_id("toast-close").click()
        page.set_input_files("#image-in input[type=file]", files["photo"])
        page.fill("#question textarea", QUESTION)
        page.wait_for_timeout(500)
        page.click("#submit")
        page.wait_for_selector("#overlay img", timeout=60_000)
        page.wait_for_selector(".m2sa-legend li", timeout=60_000)
        answer = page.inner_text(".m2sa-answer")
        assert answer == "the handle and the cup."
        legend = page.locator(".m2sa-legend li").all_inner_texts()
        assert [x.split()[:3] for x in legend] == [["1", "the", "handle"], ["2", "the", "cup"]]
        assert page.locator(".m2sa-answer .seg").count() == 2
        page.locator("#timing").get_by_text("Answered in").wait_for()
        page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
        shown = page.locator("#overlay img").get_attribute("src")
        page.locator("#toggles").get_by_text("2: the cup").click()        # hide one mask
        page.wait_for_function("(src) => document.querySelector('#overlay img').src !== src",
                               arg=shown, timeout=30_000)
        zip_url = page.locator('#downloads a[download="masks.zip"]').get_attribute("href")
        rle_url = page.locator('#downloads a[download="masks_coco_rle.json"]').get_attribute("href")
        browser.close()
    import httpx

    with zipfile.ZipFile(io.BytesIO(httpx.get(zip_url, timeout=30).content)) as z:
        assert sorted(z.namelist()) == ["mask_1.png", "mask_2.png", "result.json"]
        assert Image.open(z.open("mask_1.png")).size == (300, 200)
    coco = httpx.get(rle_url, timeout=30).json()
    assert [a["category_name"] for a in coco["annotations"]] == ["the handle", "the cup"]
    shot = Image.open(tmp_path / "page.png")
    assert shot.width == 1280 and shot.height > 600
    print(f"\nscreenshot: {tmp_path / 'page.png'}")


def test_server_stops_by_pid(server):
    proc = server["proc"]
    private = re.search(r"uploads live in (\S+) \(private", server["log"].read_text()).group(1)
    assert os.path.isdir(private) and stat.S_IMODE(os.stat(private).st_mode) == 0o700
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=30) in (0, -signal.SIGTERM)    # uvicorn re-raises it after shutdown
    assert not os.path.exists(private)                      # the graceful shutdown ran
    import httpx

    with pytest.raises(httpx.TransportError):
        httpx.get(server["url"] + "/api/health", timeout=2)


@pytest.mark.slow
def test_page_on_the_demo_model_in_headless_chromium(trained_ci_run, tmp_path):
    """The page serving the learning demo's own model (the CI variant's trained workdir, as
    ``bash scripts/serve.sh`` serves the README demo's): a val-split image and question go in
    through the browser, the model's answer and at least one mask's overlay come out."""
    if not os.path.exists(CHROMIUM):
        if os.environ.get("CI"):
            pytest.fail("chromium is missing: scripts/setup.sh installs it (apt-get install chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright
    import httpx

    val = json.load(open(os.path.join(trained_ci_run["data_root"], "MMR_val.json")))
    record = next(r for r in val if r["questions"])
    image = os.path.join(trained_ci_run["data_root"], "images", record["file_name"])
    started = _start_server(trained_ci_run["workdir"], tmp_path / "server.log",
                            "--max-batch", "1", "--row-buckets", "1", "--max-prompt-tokens", "192")
    url = started["url"]
    try:
        _wait_ready(started, 600)
        model = httpx.get(url + "/api/model", timeout=10).json()
        assert (model["kind"], model["variant"]) == ("M²SA", "m2sa"), model
        with sync_playwright() as p:
            browser = _launch_chromium(p, tmp_path / "profile")
            page = browser.new_page()
            page.goto(url + "/")
            page.wait_for_selector("#submit", timeout=60_000)
            assert page.get_by_text("A toy model.").count() == 1      # says what it is
            page.set_input_files("#image-in input[type=file]", image)
            page.fill("#question textarea", record["questions"][0])
            page.wait_for_timeout(500)
            page.click("#submit")
            page.wait_for_selector("#overlay img", timeout=120_000)
            page.wait_for_selector(".m2sa-legend li", timeout=60_000)
            answer = page.inner_text(".m2sa-answer")
            legend = page.locator(".m2sa-legend li").all_inner_texts()
            page.screenshot(path=str(tmp_path / "demo_page.png"), full_page=True)
            browser.close()
        print(f"\nQ: {record['questions'][0]}\nA: {answer}\nmasks: {legend}")
        assert answer.strip() and len(legend) >= 1
    finally:
        _stop(started)
