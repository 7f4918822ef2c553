"""mnist-dist serve: the API answers as predict does, survives bad input and load, and the page works in a browser."""
import base64
import gc
import json
import re
import shutil
import socket
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from mnist_dist.inference import predict
from mnist_dist.serving.app import create_app, load
from mnist_dist.serving.errors import BadRequest
from mnist_dist.serving.forms import parse_form
from mnist_dist.serving.options import ServeOptions

from conftest import png_bytes, run, skip_unless_required, start_server, write_test_pngs

BROWSER_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]


@pytest.fixture(scope="module")
def test_pngs(tmp_path_factory):
    """The first 300 test digits as PNG files, with their labels."""
    folder = tmp_path_factory.mktemp("pngs")
    return folder, np.array(write_test_pngs(folder, 300, "{:03d}.png"))


@pytest.fixture(scope="module")
def client(exported_model):
    options = ServeOptions(str(exported_model), threads=1, runtime="onnxruntime")  # as predict.predict runs it
    with TestClient(create_app(load(options))) as client:
        yield client


def test_api_answers_as_predict_does_on_300_pngs(client, exported_model, test_pngs):
    folder, labels = test_pngs
    expected, _ = predict.predict([folder], exported_model / "model.onnx", show_progress=False)
    files = sorted(folder.iterdir())
    answered = []
    for start in range(0, 300, 50):  # several files per request, as multipart fields named "file"
        response = client.post("/v1/predict", files=[("file", (f.name, f.read_bytes(), "image/png"))
                                                     for f in files[start : start + 50]])
        assert response.status_code == 200
        answered += response.json()["results"]
    assert [r["input"] for r in answered] == [f.name for f in files]  # request order
    assert [r["prediction"] for r in answered] == [r["prediction"] for r in expected]
    assert [r["confidence"] for r in answered] == pytest.approx([r["confidence"] for r in expected])
    assert all(len(r["probabilities"]) == 10 and abs(sum(r["probabilities"]) - 1) < 1e-6 for r in answered)
    assert np.mean([r["prediction"] == label for r, label in zip(answered, labels)]) > 0.95


def test_json_arrays_and_the_image_the_model_saw(client, test_pngs):
    folder, _ = test_pngs
    pixels = np.asarray(Image.open(folder / "000.png"))
    by_file = client.post("/v1/predict", files={"file": ("0.png", png_bytes(pixels))}).json()["results"][0]
    as_json = {"images": [pixels.tolist(), (pixels / 255).tolist()]}  # uint8 0-255, then floats 0-1
    response = client.post("/v1/predict?return_image=1", json=as_json)
    assert response.status_code == 200
    uint8, floats = response.json()["results"]
    assert uint8["prediction"] == floats["prediction"] == by_file["prediction"]
    assert uint8["image"] == pixels.tolist()  # a 28x28 input is taken as it is
    assert np.abs(np.array(floats["image"]) - pixels).max() <= 1


def test_a_bad_image_among_good_ones_gets_its_own_row(client, test_pngs):
    folder, _ = test_pngs
    good = (folder / "001.png").read_bytes()
    response = client.post("/v1/predict", files=[("file", ("a.png", good)), ("file", ("b.txt", b"not an image")),
                                                 ("file", ("c.png", good))])
    assert response.status_code == 200
    a, b, c = response.json()["results"]
    assert a["prediction"] == c["prediction"] is not None and a["error"] == c["error"] == ""
    assert b["prediction"] is None and b["error"].startswith("not a readable image")


def test_multipart_forms_are_read_as_clients_write_them():
    png = png_bytes(np.arange(784, dtype=np.uint8).reshape(28, 28))
    files = [("file", ("a.png", png)), ("file", ('b "quoted".png', b"")), ("file", ("名前.png", b"\r\n--x\r\n")),
             ("other", ("c.bin", b"3" * 5000))]
    sent = httpx.Request("POST", "http://x/", files=files, data={"file": "a text field", "note": "hi"})
    parts = parse_form(sent.read(), sent.headers["content-type"], max_parts=10)
    assert [(p.name, p.filename, p.data) for p in parts] == [
        ("file", None, b"a text field"), ("note", None, b"hi"), ("file", "a.png", png),
        ("file", 'b %22quoted%22.png', b""), ("file", "名前.png", b"\r\n--x\r\n"), ("other", "c.bin", b"3" * 5000)]
    # RFC 2046: a preamble and an epilogue are ignored; white space may pad a boundary line.
    padded = (b"preamble\r\n--b \t\r\nContent-Disposition: form-data; name=file; filename=d.png\r\n"
              b"Content-Type: image/png\r\n\r\n" + png + b"\r\n--b--\r\nepilogue")
    assert [(p.name, p.filename, p.data) for p in parse_form(padded, "multipart/form-data; boundary=b", 10)] == [
        ("file", "d.png", png)]
    assert parse_form(b"--b--\r\n", "multipart/form-data; boundary=b", 10) == []
    # However a part's Content-Disposition is written, its name and filename read as RFC 7578 and browsers write them.
    for disposition, expected in [
        (b'form-data; name="file"; filename="d.png"', ("file", "d.png")),
        (b'form-data; name="a;b"; filename=""', ("a;b", "")),
        (b'form-data; name="x"', ("x", None)),
        (b'form-data; name="x"; filename="C:\\dir\\d.png"', ("x", "d.png")),  # old browsers sent the whole path
        (b'form-data; filename="f"; name="x"', ("x", "f")),
        (b'form-data; name="x\\"y"; filename="z"', ('x"y', "z")),
    ]:
        part = parse_form(b"--b\r\nContent-Disposition: " + disposition + b"\r\n\r\nv\r\n--b--",
                          "multipart/form-data; boundary=b", 10)[0]
        assert (part.name, part.filename) == expected, disposition


@pytest.mark.parametrize("body, content_type, status, error", [
    (b"--b\r\nContent-Disposition: form-data; name=a\r\n\r\nx", "boundary=b", 400, "no closing boundary"),
    (b"--b\r\nContent-Disposition: form-data; name=a\r\n\r\nx\r\n--b--", "", 400, "no boundary"),
    (b"--bX\r\nContent-Disposition: form-data; name=a\r\n\r\nx\r\n--b--", "boundary=b", 400, "after a boundary"),
    (b"--b\r\nContent-Disposition: form-data; name=a\r\nx\r\n--b--", "boundary=b", 400, "headers never end"),
    (b"--b\r\nno colon\r\n\r\nx\r\n--b--", "boundary=b", 400, "without a colon"),
    (b"--b\r\nContent-Disposition: form-data\r\n\r\nx\r\n--b--", "boundary=b", 400, "no name"),
    (b"--b\r\nContent-Disposition: form-data; name=a\r\n\r\nx\r\n" * 3 + b"--b--", "boundary=b", 413,
     "more than 2 parts"),
], ids=["unclosed", "no boundary", "text after a boundary", "endless headers", "no colon", "no name", "too many parts"])
def test_unreadable_forms_are_the_clients_error(body, content_type, status, error):
    with pytest.raises(BadRequest) as refused:
        parse_form(body, f"multipart/form-data; {content_type}", max_parts=2)
    assert refused.value.status == status and error in str(refused.value)


def bad_requests(good_png: bytes) -> list:
    """(what, request keyword arguments, expected status): the ways clients get it wrong."""
    big = {"content": b"x" * (5 * 2**20 + 1), "headers": {"content-type": "application/octet-stream"}}
    return [
        ("not an image", {"files": {"file": ("a.png", b"hello")}}, 400),
        ("truncated PNG", {"files": {"file": ("a.png", good_png[: len(good_png) // 2])}}, 400),
        ("JSON wrong shape", {"json": {"images": [[[0] * 27] * 28]}}, 422),
        ("JSON out of range", {"json": {"images": [[[300] * 28] * 28]}}, 422),
        ("JSON not numbers", {"json": {"images": [[["a"] * 28] * 28]}}, 422),
        ("invalid JSON", {"content": b"{images:", "headers": {"content-type": "application/json"}}, 422),
        ("JSON nested deeply", {"content": b'{"images": ' + b"[" * 5000 + b"]" * 5000 + b"}",
                                "headers": {"content-type": "application/json"}}, 422),
        ("JSON without images", {"json": {"pictures": []}}, 422),
        ("empty image list", {"json": {"images": []}}, 422),
        ("body over the limit", big, 413),
        ("streamed body over the limit", {"content": iter([b"x" * 2**20] * 6),
                                          "headers": {"content-type": "application/json"}}, 413),
        ("wrong content type", {"content": b"1,2,3", "headers": {"content-type": "text/csv"}}, 415),
        ("form without a file field", {"data": {"picture": "x"}, "files": {"other": ("a.png", good_png)}}, 422),
        ("a text field named file", {"data": {"file": "hello"}, "files": {"other": ("a.png", good_png)}}, 400),
        ("unknown invert", {"params": {"invert": "maybe"}, "files": {"file": ("a.png", good_png)}}, 422),
    ]


def test_bad_requests_get_one_line_errors_and_the_server_keeps_answering(client, test_pngs):
    folder, labels = test_pngs
    good = (folder / "002.png").read_bytes()
    cases = bad_requests(good)
    for what, request, status in cases * 16:  # 224 bad requests
        if "streamed" in what:
            request = dict(request, content=iter([b"x" * 2**20] * 6))  # a fresh stream each time
        response = client.post("/v1/predict", **request)
        assert response.status_code == status, what
        body = response.json()
        assert isinstance(body["error"], str) and body["error"] and "\n" not in body["error"], what
        assert "Traceback" not in response.text
    for i in (2, 3, 4):
        answer = client.post("/v1/predict", files={"file": ("x.png", (folder / f"{i:03d}.png").read_bytes())})
        assert answer.status_code == 200 and answer.json()["results"][0]["prediction"] == labels[i]


def test_model_and_health_endpoints(client, exported_model):
    manifest = json.loads((exported_model / "manifest.json").read_text())
    assert client.get("/healthz").json() == {"status": "ok"}
    info = client.get("/v1/model").json()
    assert info["input"] == manifest["input"] and info["classes"] == manifest["classes"]
    assert info["test_accuracy"] == manifest["pytorch_test_accuracy"]
    assert info["temperature"] == manifest["calibration"]["temperature"]
    assert info["sha256"]["model.onnx"] == manifest["files"]["model.onnx"]["sha256"]
    assert info["runtime"].startswith("onnxruntime") and info["batching"]["on"] is True
    assert (info["name"], info["version"]) == ("mnist", "1")
    # An app made in someone else's process leaves the process as it was: only the server tunes its own.
    assert gc.get_freeze_count() == 0 and sys.getswitchinterval() == 0.005
    page = client.get("/")
    assert page.status_code == 200 and '<canvas id="pad"' in page.text
    assert "http" not in re.sub(r"https?://(127\.0\.0\.1|localhost)", "", client.get("/static/app.js").text)


@pytest.fixture(scope="module")
def server(exported_model):
    """A real server on loopback, started as users start it; yields its base URL."""
    proc, url = start_server(exported_model)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def test_concurrent_clients_all_get_correct_answers(server, client, test_pngs):
    folder, _ = test_pngs
    files = sorted(folder.iterdir())[:50]
    expected = [client.post("/v1/predict", files={"file": (f.name, f.read_bytes())}).json()["results"][0]["prediction"]
                for f in files]

    def one_client(worker: int) -> list:
        with httpx.Client(base_url=server, timeout=30) as http:
            return [http.post("/v1/predict", files={"file": (f.name, f.read_bytes())}) for f in files]

    with ThreadPoolExecutor(8) as pool:
        answers = [r for responses in pool.map(one_client, range(8)) for r in responses]
    assert len(answers) == 400 and all(r.status_code == 200 for r in answers)
    assert [r.json()["results"][0]["prediction"] for r in answers] == expected * 8
    runs = httpx.get(server + "v1/model").json()["batching"]["model_runs"]
    assert runs < 400  # concurrent requests shared model runs


def serve_error(*args) -> str:
    proc = run([sys.executable, "-m", "mnist_dist.cli", "serve", *args], check=False, timeout=60)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert proc.returncode != 0 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return errors[0]


def test_start_up_errors_are_one_line(exported_model, tmp_path):
    assert "has no manifest.json" in serve_error("--model-dir", tmp_path)
    changed = tmp_path / "changed"
    shutil.copytree(exported_model, changed)
    (changed / "model.onnx").write_bytes((changed / "model.onnx").read_bytes()[:-10])
    assert "sha256 mismatch" in serve_error("--model-dir", changed)
    assert "does not exist" in serve_error("--model-dir", exported_model, "--model", "model.v2.onnx")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert f"cannot listen on 127.0.0.1:{port}" in serve_error("--model-dir", exported_model, "--port", port)


def browser_or_skip():
    """Debian's Chromium driven by Playwright; skipped with a reason where either is missing, unless required."""
    chromium = shutil.which("chromium")
    reason = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        reason, sync_playwright = "Playwright for Python is not installed", None
    if chromium is None:
        reason = "no chromium on PATH (apt-get install -y chromium)"
    if reason:
        skip_unless_required(reason)
    return chromium, sync_playwright


def test_drawing_a_digit_in_a_real_browser(server, tmp_path):
    chromium, sync_playwright = browser_or_skip()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=BROWSER_FLAGS)
        page = browser.new_page(viewport={"width": 800, "height": 560})
        page.goto(server)
        box = page.locator("#pad").bounding_box()
        x, y, mouse = box["x"], box["y"], page.mouse
        mouse.move(x + 70, y + 70)  # a 7: the bar, then the stem
        mouse.down()
        mouse.move(x + 205, y + 70, steps=12)
        mouse.move(x + 125, y + 235, steps=16)
        mouse.up()
        page.wait_for_function("document.body.dataset.predictions === '1'", timeout=15_000)
        shown = int(page.locator("#prediction").inner_text())
        drawn = page.evaluate("document.getElementById('pad').toDataURL('image/png')")
        seen = page.evaluate("Array.from(document.getElementById('seen').getContext('2d')"
                             ".getImageData(0, 0, 28, 28).data.filter((_, i) => i % 4 === 0))")
        page.screenshot(path=str(tmp_path / "serve.png"))
        browser.close()
    png = base64.b64decode(drawn.split(",", 1)[1])
    api = httpx.post(server + "v1/predict?return_image=1", files={"file": ("drawn.png", png)}).json()["results"][0]
    assert shown == api["prediction"]
    assert seen == [v for row in api["image"] for v in row]  # the page shows exactly the image the model saw
    assert (tmp_path / "serve.png").stat().st_size > 10_000
