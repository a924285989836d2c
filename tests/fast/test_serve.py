"""stx serve: a real server on a loopback port, a real HTTP client (requests)."""

import io
import os
import re
import signal
import socket
import struct
import subprocess
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
import torch
from conftest import STX
from PIL import Image

from stx.fast import export
from stx.fast.transformer import TransformerNet

pytestmark = pytest.mark.slow
MAX_PIXELS = 96 * 96
MAX_UPLOAD_MB = 0.1


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def random_image(height, width, seed):
    return (np.random.default_rng(seed).random((height, width, 3)) * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    torch.manual_seed(0)
    model = TransformerNet(channels=4, residual_blocks=1)
    path = export.export_torchscript(model, tmp_path_factory.mktemp("model") / export.TORCHSCRIPT_FILE)
    return path, model.eval()


@pytest.fixture(scope="module")
def server(tmp_path_factory, model_file):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    folder = tmp_path_factory.mktemp("serve")
    process = subprocess.Popen(
        [*STX, "serve", "--model", f"tiny={model_file[0]}", "--optimize", "--port", str(port), "--device", "cpu",
         "--max-pixels", str(MAX_PIXELS), "--max-upload-mb", str(MAX_UPLOAD_MB), "--max-steps", "5",
         "encoder.weights=random", "schedule=adam"],
        cwd=folder, env={**os.environ, "STX_RUNS_DIR": str(folder / "runs")}, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=open(folder / "server.log", "w"),
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        try:
            requests.get(f"{url}/health", timeout=2)
            break
        except requests.ConnectionError:
            if time.monotonic() > deadline or process.poll() is not None:
                pytest.fail(f"stx serve did not start: {(folder / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
    yield url
    os.killpg(process.pid, signal.SIGTERM)
    process.wait(timeout=30)


def test_health_lists_models_and_optimisation(server):
    health = requests.get(f"{server}/health", timeout=10).json()
    assert health["status"] == "ok" and health["models"] == ["tiny"] and health["optimize"] is True


def test_stylize_returns_the_model_output_as_png(server, model_file):
    image = random_image(37, 53, seed=1)
    response = requests.post(f"{server}/stylize/tiny", files={"image": ("a.png", png_bytes(image))}, timeout=60)
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    got = np.asarray(Image.open(io.BytesIO(response.content)), dtype=int)
    with torch.no_grad():
        expected = model_file[1](torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255)
    expected = (expected[0].permute(1, 2, 0).numpy() * 255)
    assert got.shape == (37, 53, 3) and np.abs(got - expected).max() <= 1.0


def test_eight_concurrent_requests_all_succeed(server):
    images = [random_image(24 + 4 * i, 40, seed=10 + i) for i in range(8)]

    def post(image):
        return requests.post(f"{server}/stylize/tiny", files={"image": ("x.png", png_bytes(image))}, timeout=120)

    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(post, images))
    assert [r.status_code for r in responses] == [200] * 8
    assert [Image.open(io.BytesIO(r.content)).size for r in responses] == [(40, 24 + 4 * i) for i in range(8)]


def png_header(width, height):
    """A PNG file's header: its signature, an IHDR chunk declaring ``width×height`` RGB pixels, an empty IDAT."""
    chunk = lambda kind, data: struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + chunk(b"IDAT", b"")


def test_bad_uploads_get_clear_4xx(server):
    def post(data, name="tiny"):
        return requests.post(f"{server}/stylize/{name}", files={"image": ("x.png", data)}, timeout=60)

    not_image = post(b"hello, not an image")
    assert not_image.status_code == 400 and "is not an image Pillow can read" in not_image.json()["detail"]
    too_many = post(png_bytes(np.zeros((100, 100, 3), np.uint8)))  # tiny file, 10 000 pixels
    assert too_many.status_code == 413
    assert f"100×100 = 10000 pixels; this service accepts at most {MAX_PIXELS}" in too_many.json()["detail"]
    too_large = post(os.urandom(int(MAX_UPLOAD_MB * 2**20) + 1000))
    assert too_large.status_code == 413 and "larger than this service's limit" in too_large.json()["detail"]
    bomb = post(png_header(60000, 60000))  # 45 bytes that declare 3.6 G pixels
    assert bomb.status_code == 413 and "header declares more pixels than this service accepts" in bomb.json()["detail"]

    def chunked_form():  # no Content-Length: the limit is found as the body streams in
        yield b"--x\r\nContent-Disposition: form-data; name=\"image\"; filename=\"x.png\"\r\n\r\n"
        for _ in range(int(MAX_UPLOAD_MB * 4) + 2):
            yield bytes(2**18)
        yield b"\r\n--x--\r\n"

    streamed = requests.post(f"{server}/stylize/tiny", data=chunked_form(), timeout=60,
                             headers={"Content-Type": "multipart/form-data; boundary=x"})
    assert streamed.status_code == 413 and "larger than this service's limit" in streamed.json()["detail"]
    unknown = post(png_bytes(random_image(32, 32, 0)), name="nosuch")
    assert unknown.status_code == 404 and "loaded models: tiny" in unknown.json()["detail"]
    thin = requests.post(f"{server}/stylize/tiny", params={"size": 32},  # 90×20 → 32×7 px
                         files={"image": ("x.png", png_bytes(random_image(20, 90, 0)))}, timeout=60)
    assert thin.status_code == 400 and "both edges must be at least" in thin.json()["detail"]
    missing = requests.post(f"{server}/stylize/tiny", timeout=60)
    assert missing.status_code == 422 and missing.json()["detail"] == (
        "the request to /stylize/tiny is not valid (image: Field required); see /docs for the fields and parameters "
        "it takes.")
    bad_size = requests.post(f"{server}/stylize/tiny", params={"size": "abc"},
                             files={"image": ("x.png", png_bytes(random_image(32, 32, 0)))}, timeout=60)
    assert bad_size.status_code == 422 and bad_size.json()["detail"].startswith(
        "the request to /stylize/tiny is not valid (size: Input should be a valid integer")
    assert requests.get(f"{server}/health", timeout=10).status_code == 200  # still serving


def test_optimize_caches_the_style_targets(server):
    content, style = png_bytes(random_image(40, 48, 1)), png_bytes(random_image(48, 48, 2))
    other_style = png_bytes(random_image(48, 48, 3))

    def optimize(style_bytes, size=32):
        return requests.post(f"{server}/optimize", params={"steps": 2, "size": size},
                             files={"content": ("c.png", content), "style": ("s.png", style_bytes)}, timeout=120)

    first, second = optimize(style), optimize(style)
    assert first.status_code == second.status_code == 200
    assert (first.headers["x-style-cache"], second.headers["x-style-cache"]) == ("miss", "hit")
    assert first.content == second.content  # the cached targets give the same result
    assert optimize(other_style).headers["x-style-cache"] == "miss"
    assert optimize(style, size=40).headers["x-style-cache"] == "miss"  # another size, another key
    assert Image.open(io.BytesIO(first.content)).size == (32, 27)
    cache = requests.get(f"{server}/health", timeout=10).json()["style_cache"]
    assert cache == {"hits": 1, "misses": 3, "entries": 3}
    too_many_steps = requests.post(f"{server}/optimize", params={"steps": 6},
                                   files={"content": ("c.png", content), "style": ("s.png", style)}, timeout=60)
    assert too_many_steps.status_code == 422


def test_admission_turns_work_beyond_its_queue_away_with_503():
    from fastapi import HTTPException

    from stx.fast.serve import Admission

    admission, release, inside = Admission(workers=1, queue=1), threading.Event(), threading.Event()

    def hold():
        with admission:
            inside.set()
            release.wait(30)

    running, waiting = threading.Thread(target=hold), threading.Thread(target=hold)
    running.start()
    inside.wait(30)
    waiting.start()  # queued behind the first
    deadline = time.monotonic() + 30
    while admission.admitted < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(HTTPException) as refused:
        admission.__enter__()
    assert refused.value.status_code == 503 and refused.value.headers["Retry-After"] == "5"
    release.set()
    running.join(30), waiting.join(30)
    assert admission.admitted == 0 and admission.rejected == 1
    with admission:  # room again
        assert admission.admitted == 1


def test_the_page_and_the_api_description_say_what_the_service_does(server):
    page = requests.get(f"{server}/", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "<option>tiny</option>" in page.text and 'fetch("/stylize/"' in page.text
    assert "http" not in page.text.replace('href="/', "")  # nothing is fetched from elsewhere
    api = requests.get(f"{server}/openapi.json", timeout=10).json()
    for path in ("/stylize/{name}", "/optimize"):
        post = api["paths"][path]["post"]
        assert "image/png" in post["responses"]["200"]["content"] and post["summary"] and post["description"]
        assert "503" in post["responses"]
    assert api["paths"]["/health"]["get"]["summary"]


@pytest.mark.parametrize("docs", ["/docs", "/redoc"])
def test_the_api_docs_work_offline(server, docs):
    page = requests.get(f"{server}{docs}", timeout=10)
    assert page.status_code == 200 and "/openapi.json" in page.text
    assets = re.findall(r'(?:src|href)="([^"]+)"', page.text) + re.findall(r"url: '([^']+)'", page.text)
    scripts = [asset for asset in assets if asset.endswith(".js")]
    assert scripts and not [asset for asset in assets if "://" in asset]  # every asset from the service itself
    for asset in scripts:
        served = requests.get(f"{server}{asset}", timeout=10)
        assert served.status_code == 200 and len(served.content) > 100_000  # the whole UI bundle
