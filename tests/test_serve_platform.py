"""mnist-dist serve as deployment platforms run it: the Open Inference Protocol with Triton's own client, Prometheus
metrics, backpressure, draining on SIGTERM, several workers, request IDs, hardening, and a fuzz of the whole API."""
import asyncio
import contextlib
import dataclasses
import io
import json
import re
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from mnist_dist.bench.serve import answers_alone, encode, peak_rss_mb, run_clients
from mnist_dist.data import mnist
from mnist_dist.inference import predict
from mnist_dist.inference.models import open_model
from mnist_dist.serving.app import create_app, load
from mnist_dist.serving.batching import Doorbell, Job, MicroBatcher
from mnist_dist.serving.options import ServeOptions

from conftest import calibrated_softmax, png_bytes, start_server, wait_for

pytestmark = pytest.mark.slow  # the tests start servers and drive them under load

INFER = "v2/models/mnist/infer"


def stop(proc) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=60)


@pytest.fixture(scope="module")
def server(exported_model, tmp_path_factory):
    """(base URL, access log path, process id) of one server for the module's read-mostly tests, with two model
    threads (one is the default)."""
    log = tmp_path_factory.mktemp("access") / "access.jsonl"
    proc, url = start_server(exported_model, "--access-log", log, "--model-threads", 2)
    assert httpx.get(url + "v1/model").json()["batching"]["model_threads"] == 2
    yield url, log, proc.pid
    assert stop(proc) == 0


@pytest.fixture(scope="module")
def test_images():
    pixels, labels = mnist.load_split("test")
    return pixels[:1000].numpy(), labels[:1000].numpy()


def triton(url: str):
    import tritonclient.http as triton_http

    return triton_http, triton_http.InferenceServerClient(url.removeprefix("http://").rstrip("/"))


@pytest.mark.parametrize("binary", [True, False], ids=["binary tensors", "JSON tensors"])
def test_tritons_own_client_gets_what_onnxruntime_gives(server, exported_model, test_images, binary):
    url, _, _ = server
    triton_http, client = triton(url)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("mnist")
    metadata = client.get_model_metadata("mnist")
    assert metadata["inputs"] == [{"name": "images", "datatype": "FP32", "shape": [-1, 1, 28, 28]}]
    assert [o["name"] for o in metadata["outputs"]] == ["logits", "probabilities"]
    pixels, labels = test_images
    images = (pixels[:, None] / np.float32(255)).astype(np.float32)
    expected = open_model(exported_model / "model.onnx", "onnxruntime", 1).run(images)
    logits, probabilities = [], []
    for start in range(0, 1000, 200):
        tensor = triton_http.InferInput("images", [200, 1, 28, 28], "FP32")
        tensor.set_data_from_numpy(images[start : start + 200], binary_data=binary)
        if binary:  # the client's defaults: binary in, every output binary out
            result = client.infer("mnist", [tensor], request_id=f"batch-{start}")
        else:
            asked = [triton_http.InferRequestedOutput(name, binary_data=False) for name in ("logits", "probabilities")]
            result = client.infer("mnist", [tensor], outputs=asked, request_id=f"batch-{start}")
        assert result.get_response()["id"] == f"batch-{start}"
        logits.append(result.as_numpy("logits"))
        probabilities.append(result.as_numpy("probabilities"))
    logits, probabilities = np.concatenate(logits), np.concatenate(probabilities)
    assert (logits.argmax(1) == expected.argmax(1)).all()
    assert np.abs(logits - expected).max() < 1e-4
    assert (probabilities.argmax(1) == logits.argmax(1)).all() and np.allclose(probabilities.sum(1), 1, atol=1e-5)
    assert (logits.argmax(1) == labels).mean() > 0.95


def test_every_consumer_gives_the_same_calibrated_probabilities(server, exported_model, test_images, tmp_path):
    """The Open Inference Protocol, /v1 (which the drawing page shows) and predict's rows, against onnxruntime's
    logits divided by the manifest's temperature, here."""
    import onnxruntime as ort

    url, _, _ = server
    pixels = test_images[0][:20]
    session = ort.InferenceSession(str(exported_model / "model.onnx"), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"images": pixels[:, None].astype(np.float32) / 255})[0]
    temperature = json.loads((exported_model / "manifest.json").read_text())["calibration"]["temperature"]
    expected = calibrated_softmax(logits, temperature)
    assert temperature != pytest.approx(1, abs=0.05) and not np.allclose(expected, calibrated_softmax(logits, 1))
    infer = {"inputs": [{"name": "images", "datatype": "UINT8", "shape": [20, 1, 28, 28],
                         "data": pixels.reshape(-1).tolist()}], "outputs": [{"name": "probabilities"}]}
    oip = np.array(httpx.post(url + INFER, json=infer).json()["outputs"][0]["data"]).reshape(20, 10)
    v1 = httpx.post(url + "v1/predict?invert=no", json={"images": pixels.tolist()}).json()["results"]
    np.save(tmp_path / "digits.npy", pixels)
    rows, _ = predict.predict([tmp_path / "digits.npy"], exported_model / "model.onnx", "no", show_progress=False)
    assert np.abs(oip - expected).max() < 1e-6  # FP32 on the wire
    assert np.abs(np.array([r["probabilities"] for r in v1]) - expected).max() < 1e-6
    assert np.abs(np.array([r["confidence"] for r in rows]) - expected.max(1)).max() < 1e-6
    top3 = np.array([[p for _, p in r["top3"]] for r in rows])
    assert np.abs(top3 - np.sort(expected, 1)[:, ::-1][:, :3]).max() < 1e-6


def test_uint8_pixels_nested_json_and_spec_errors(server, test_images):
    url, _, _ = server
    pixels, labels = test_images
    nested = {"id": "x", "inputs": [{"name": "images", "datatype": "UINT8", "shape": [3, 1, 28, 28],
                                      "data": pixels[:3, None].tolist()}]}
    answer = httpx.post(url + INFER, json=nested).json()
    logits = {o["name"]: o for o in answer["outputs"]}["logits"]
    assert answer["id"] == "x" and logits["shape"] == [3, 10]
    assert np.array(logits["data"]).reshape(3, 10).argmax(1).tolist() == labels[:3].tolist()
    bad = [({"inputs": [{"name": "images", "datatype": "FP32", "shape": [1, 28, 28], "data": [0] * 784}]}, 400),
           ({"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 1, 28, 28], "data": [0] * 784}]}, 400),
           ({"inputs": [{"name": "images", "datatype": "UINT8", "shape": [1, 1, 28, 28], "data": [300] * 784}]}, 400),
           ({"inputs": [{"name": "images", "datatype": "FP32", "shape": [257, 1, 28, 28], "data": []}]}, 413),
           ({"inputs": []}, 400)]
    for body, status in bad:
        response = httpx.post(url + INFER, json=body)
        assert response.status_code == status and "\n" not in response.json()["error"], body
    deep = httpx.post(url + INFER, content=b'{"inputs": ' + b"[" * 5000 + b"]" * 5000 + b"}",
                      headers={"content-type": "application/json"})
    assert deep.status_code == 400 and "\n" not in deep.json()["error"]  # Python's json module: RecursionError, 500
    assert httpx.post(url + "v2/models/other/infer", json=nested).status_code == 404
    assert httpx.get(url + "v2/models/other").status_code == 404


def samples(url: str) -> dict:
    """Every sample of /metrics, by (name, labels as sorted tuples)."""
    text = httpx.get(url + "metrics").text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def delta(before: dict, after: dict, name: str, **labels) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0) - before.get(key, 0)


def oip_body(images: np.ndarray) -> dict:
    return {"inputs": [{"name": "images", "datatype": "UINT8", "shape": [len(images), 1, 28, 28],
                        "data": images.reshape(-1).tolist()}]}


def test_metrics_count_what_was_sent(server, test_images):
    url, _, _ = server
    pixels, _ = test_images
    before = samples(url)
    for i in range(7):  # 7 requests, 1 + 2 + ... + 7 = 28 images
        assert httpx.post(url + INFER, json=oip_body(pixels[: i + 1])).status_code == 200
    for _ in range(3):
        assert httpx.post(url + INFER, json={"inputs": []}).status_code == 400
    after = samples(url)
    route = "/v2/models/{name}/infer"
    assert delta(before, after, "mnist_dist_requests_total", route=route, method="POST", status="200") == 7
    assert delta(before, after, "mnist_dist_requests_total", route=route, method="POST", status="400") == 3
    assert delta(before, after, "mnist_dist_request_seconds_count", route=route) == 10
    model = {"model": "mnist", "version": "1"}
    assert delta(before, after, "mnist_dist_images_total", outcome="labelled", **model) == 28
    assert delta(before, after, "mnist_dist_batch_images_sum", **model) == 28
    # the bad ones are parsed there too
    assert delta(before, after, "mnist_dist_queue_wait_seconds_count", **model) == 10
    assert delta(before, after, "mnist_dist_model_run_seconds_count", **model) == delta(
        before, after, "mnist_dist_batch_images_count", **model) >= 1
    assert after[("mnist_dist_model_ready", (("model", "mnist"), ("version", "1")))] == 1
    assert after[("mnist_dist_requests_in_flight", ())] == 1  # the scrape itself


def test_request_ids_are_echoed_or_made_and_logged(server):
    url, log, _ = server
    given = httpx.get(url + "v2/health/live", headers={"X-Request-ID": "trace-42"})
    made = httpx.get(url + "v2/health/live")
    assert given.headers["x-request-id"] == "trace-42"
    assert re.fullmatch(r"[0-9a-f]{16}-[0-9a-f]+", made.headers["x-request-id"])
    assert httpx.get(url + "v2/health/live", headers={"X-Request-ID": "bad\tid"}).headers["x-request-id"] != "bad\tid"

    def ours() -> list:
        lines = [json.loads(line) for line in Path(log).read_text().splitlines()]
        return [line for line in lines if line["request_id"] in ("trace-42", made.headers["x-request-id"])]

    wait_for(lambda: len(ours()) >= 2, timeout=30)  # the log line is written after the answer is sent
    assert len(ours()) == 2 and all(line["status"] == 200 and line["path"] == "/v2/health/live" for line in ours())


def test_a_small_png_of_144_million_pixels_is_refused_at_no_memory_cost(server):
    url, _, pid = server
    buffer = io.BytesIO()
    Image.new("L", (12_000, 12_000)).save(buffer, format="PNG")
    bomb = buffer.getvalue()
    assert len(bomb) < 200_000  # 144 MB of pixels once decoded
    peak = peak_rss_mb(pid)
    for _ in range(3):
        response = httpx.post(url + "v1/predict", files={"file": ("bomb.png", bomb)})
        assert response.status_code == 400 and "over the limit" in response.json()["error"]
    assert peak_rss_mb(pid) - peak < 50  # decoded, it would take 144 MB


def test_a_text_field_named_file_and_too_many_images_are_client_errors(server):
    url, _, _ = server
    text_only = httpx.post(url + "v1/predict", files={"file": (None, b"hello")})
    assert text_only.status_code == 400 and "not text" in text_only.json()["error"]
    too_many = httpx.post(url + "v1/predict", json={"images": [[[0] * 28] * 28] * 257})
    assert too_many.status_code == 413


def with_run(repository, wrap):
    """The repository, its model's run replaced by ``wrap(run)``."""
    model = repository.default()
    model.runner = dataclasses.replace(model.runner, run=wrap(model.runner.run))
    return repository


def batcher_of(app):
    return app.state.repository.default().batcher


def slowed(repository, seconds: float):
    """The same model, each run taking ``seconds`` longer: a server that cannot keep up."""

    def slow(run):
        def slow_run(images):
            time.sleep(seconds)
            return run(images)
        return slow_run

    return with_run(repository, slow)


async def burst(app, requests: int, body: dict) -> list:
    """``requests`` concurrent requests; [(response, seconds it took)]."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:

            async def timed():
                started = time.perf_counter()
                response = await client.post("/" + INFER, json=body)
                return response, time.perf_counter() - started

            return await asyncio.gather(*(timed() for _ in range(requests)))


def test_the_load_generator_counts_every_answer_and_catches_wrong_ones(server, test_images):
    url, _, pid = server
    requests = [encode("oip-binary", pixels) for pixels in test_images[0][:8]]
    right = answers_alone(url, "oip-binary", requests)
    assert right == list(test_images[1][:8])  # the model reads these eight right
    measured = run_clients(url, "oip-binary", requests, right, 4, 0.5, 0.2, pid)
    assert measured["requests"] > 0 and measured["statuses"] == {"200": measured["requests"]}
    assert measured["errors"] == 0 and measured["p50_ms"] > 0
    assert measured["server_cpu_us_per_request"] > 0 and measured["load_generator_cpu_us_per_request"] > 0
    wrong = run_clients(url, "oip-binary", requests, [(label + 1) % 10 for label in right], 4, 0.5, 0.2)
    assert wrong["errors"] == wrong["requests"] > 0 and wrong["error_examples"] == ["wrong answer"]
    # A refusal is counted by its status, and why the server refused is kept.
    unknown = [(path.replace("/mnist/", "/nine/"), headers, body) for path, headers, body in requests]
    refused = run_clients(url, "oip-binary", unknown, right, 2, 0.3, 0.1)
    assert refused["statuses"] == {"404": refused["requests"]} and refused["errors"] == refused["requests"] > 0
    assert "no model 'nine'" in json.loads(refused["refusal_examples"]["404"])["error"]


def test_a_full_queue_answers_503_with_retry_after_at_once(exported_model, test_images):
    served = slowed(load(ServeOptions(str(exported_model), threads=1, runtime="onnxruntime", max_queue=4,
                                      max_batch=2)), 0.2)
    app = create_app(served)
    answers = asyncio.run(burst(app, 24, oip_body(test_images[0][:1])))
    statuses = [a.status_code for a, _ in answers]
    assert set(statuses) == {200, 503} and statuses.count(503) >= 12, statuses
    refused = [(a, seconds) for a, seconds in answers if a.status_code == 503]
    assert all(a.headers["retry-after"] == "1" and "waiting for the model" in a.json()["error"] for a, _ in refused)
    # At once: every refusal was sent before the queue it was refused from had drained, i.e. before the last
    # answer that the model gave.
    answered = [seconds for a, seconds in answers if a.status_code == 200]
    assert max(seconds for _, seconds in refused) < max(answered)
    assert batcher_of(app).batches >= 2


def test_a_request_that_waits_too_long_gets_504(exported_model, test_images):
    served = slowed(load(ServeOptions(str(exported_model), threads=1, runtime="onnxruntime", max_batch=1,
                                      timeout_s=0.3)), 0.5)
    app = create_app(served)
    answers = asyncio.run(burst(app, 5, oip_body(test_images[0][:1])))
    statuses = [a.status_code for a, _ in answers]
    assert statuses == [504] * 5, statuses
    # At most one run per model thread began; the others timed out while those ran and never reached the model.
    assert batcher_of(app).batches <= len(batcher_of(app).threads) < 5


def test_a_model_that_fails_is_a_one_line_500_and_the_next_request_is_answered(exported_model, test_images):
    broken = threading.Event()

    def unless_broken(run):
        def run_unless_broken(images):
            if broken.is_set():
                raise RuntimeError("the model broke")
            return run(images)
        return run_unless_broken

    app = create_app(with_run(load(ServeOptions(str(exported_model), threads=1, runtime="onnxruntime")),
                              unless_broken))

    async def requests():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)  # as uvicorn: logged, not raised
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                broken.set()
                failed = [await client.post("/" + INFER, json=oip_body(test_images[0][:1])),
                          await client.post("/v1/predict", files={"file": ("d.png", png_bytes(test_images[0][0]))})]
                broken.clear()
                return failed, await client.post("/" + INFER, json=oip_body(test_images[0][:1]))

    failed, after = asyncio.run(requests())
    assert [(r.status_code, r.json()) for r in failed] == [(500, {"error": "internal error (RuntimeError)"})] * 2
    assert all(r.headers.get("x-request-id") for r in failed)  # observed like every other answer
    assert after.status_code == 200 and after.json()["outputs"][0]["data"]


def test_model_threads_run_batches_side_by_side(exported_model, test_images):
    both_inside = threading.Barrier(2, timeout=60)

    def when_both_are_inside(run):
        def run_when_both_are_inside(images):
            both_inside.wait()  # one model thread would wait here alone until the barrier breaks
            return run(images)
        return run_when_both_are_inside

    repository = load(ServeOptions(str(exported_model), threads=1, runtime="onnxruntime", max_batch=1,
                                   model_threads=2))
    app = create_app(with_run(repository, when_both_are_inside))
    answers = asyncio.run(burst(app, 2, oip_body(test_images[0][:1])))
    assert [a.status_code for a, _ in answers] == [200, 200]
    assert len(batcher_of(app).threads) == 2 and not both_inside.broken


def test_a_ring_wakes_one_idle_model_thread_and_work_already_there_is_not_slept_through():
    doorbell, woke = Doorbell(), []

    def idle(name):
        doorbell.wait(lambda: False)
        woke.append(name)

    threads = [threading.Thread(target=idle, args=(name,)) for name in "ab"]
    for thread in threads:
        thread.start()
    wait_for(lambda: doorbell.idle == 2)
    doorbell.ring()
    wait_for(lambda: len(woke) == 1)
    assert doorbell.idle == 1  # the other is still asleep; threading.Event would have woken both
    doorbell.ring()
    for thread in threads:
        thread.join(60)
    assert sorted(woke) == ["a", "b"] and not doorbell.idle
    started = time.perf_counter()
    doorbell.wait(lambda: True, timeout=60)  # ready before the wait: no wait at all
    assert time.perf_counter() - started < 30 and not doorbell.idle


class Timed(Job):
    """A job whose Python work takes a while (with the GIL released, as numpy and Pillow release it), timed."""

    def __init__(self, spans: list):
        self.spans = spans

    def prepare(self) -> np.ndarray:
        with timed(self.spans, "python"):
            time.sleep(0.03)
        return np.zeros((1, 1, 28, 28), np.float32)

    def finish(self, logits: np.ndarray):
        with timed(self.spans, "python"):
            time.sleep(0.03)
        return logits.argmax(1).tolist()


@contextlib.contextmanager
def timed(spans: list, kind: str):
    start = time.perf_counter()
    yield
    spans.append((kind, start, time.perf_counter()))


def test_model_threads_take_turns_at_python_and_run_the_model_together():
    spans: list = []
    both_inside = threading.Barrier(2, timeout=60)

    def model(batch):
        with timed(spans, "model"):
            both_inside.wait()  # each run waits for the other thread's: they can only finish side by side
        return (np.zeros((len(batch), 10), np.float32),)

    async def four_jobs():
        batcher = MicroBatcher(model, max_batch=1, threads=2)
        await batcher.start()
        answers = await asyncio.gather(*(batcher(Timed(spans)) for _ in range(4)))
        await batcher.stop()
        return answers

    assert asyncio.run(four_jobs()) == [[0]] * 4
    python = sorted((start, end) for kind, start, end in spans if kind == "python")
    model_runs = sorted((start, end) for kind, start, end in spans if kind == "model")
    assert len(python) == 8 and len(model_runs) == 4
    # Never two threads in Python at once (they would hand the GIL to each other at every release), while the
    # model runs of both threads overlap (the barrier let none finish alone).
    assert all(earlier[1] <= later[0] for earlier, later in zip(python, python[1:]))
    assert not both_inside.broken


def test_model_threads_taking_jobs_at_once_neither_fail_nor_lose_one():
    """Two model threads take what is waiting while requests keep arriving; the GIL switching as often as it can
    makes every interleaving likely within a second."""
    batcher = MicroBatcher(lambda images: (images,), threads=2)
    taken: list = []
    failures: list = []
    until = time.perf_counter() + 1.0

    def take():
        try:
            while time.perf_counter() < until:
                taken.extend(batcher.take_all())
        except Exception as e:
            failures.append(e)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        takers = [threading.Thread(target=take) for _ in range(2)]
        for thread in takers:
            thread.start()
        sent = 0
        while time.perf_counter() < until:
            batcher.waiting.append(sent)
            sent += 1
        for thread in takers:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    taken += batcher.take_all()
    assert failures == [] and sorted(taken) == list(range(sent))


def test_a_batch_waits_up_to_max_wait_for_more_jobs():
    sizes: list = []

    def model(batch):
        sizes.append(len(batch))
        return (np.zeros((len(batch), 10), np.float32),)

    async def one_then_another():
        batcher = MicroBatcher(model, max_batch=4, max_wait=0.4, threads=1)
        await batcher.start()
        first = asyncio.ensure_future(batcher(Timed([])))
        await asyncio.sleep(0.15)
        answers = await asyncio.gather(first, batcher(Timed([])))
        await batcher.stop()
        return answers

    assert asyncio.run(one_then_another()) == [[0], [0]] and sizes == [2]  # one run for both


def test_sigterm_answers_every_request_in_flight_then_exits_0(exported_model, test_images):
    proc, url = start_server(exported_model, "--drain-s", 30, "--max-queue", 0)
    try:
        drain_with_requests_in_flight(proc, url, test_images)
    finally:
        proc.kill()


def drain_with_requests_in_flight(proc, url: str, test_images) -> None:
    big = (test_images[0][:256, None] / np.float32(255)).astype("<f4")  # 256 images: tens of ms each on one thread
    header = json.dumps({"inputs": [{"name": "images", "datatype": "FP32", "shape": list(big.shape),
                                     "parameters": {"binary_data_size": big.nbytes}}]}).encode()
    headers = {"Inference-Header-Content-Length": str(len(header)), "Content-Type": "application/octet-stream"}

    clients = [httpx.Client(base_url=url, timeout=60) for _ in range(20)]
    for client in clients:  # connected and kept alive: the 20 requests then go out together
        client.get("healthz")
    together = threading.Barrier(20)

    def one(client):
        together.wait()
        return client.post(INFER, content=header + big.tobytes(), headers=headers)

    with ThreadPoolExecutor(20) as pool:
        futures = [pool.submit(one, client) for client in clients]
        deadline = time.monotonic() + 20
        while samples(url).get(("mnist_dist_requests_in_flight", ()), 0) < 11:  # 10 being answered, and this scrape
            assert time.monotonic() < deadline, "the requests were never in flight"
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(httpx.TransportError):  # refused: no longer listening
            assert httpx.get(url + "v2/health/ready").status_code == 400  # not ready at once
        answers = [f.result() for f in futures]
    assert [a.status_code for a in answers] == [200] * 20
    assert sum(a.headers.get("connection") == "close" for a in answers) >= 5  # those answered while draining
    assert proc.wait(timeout=30) == 0
    with pytest.raises(httpx.TransportError):
        httpx.get(url + "healthz")


def test_two_workers_share_the_port_and_their_metrics_add_up(exported_model, test_images):
    proc, url = start_server(exported_model, "--workers", 2)
    try:
        pixels, labels = test_images
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda i: httpx.post(url + INFER, json=oip_body(pixels[i : i + 1])), range(40)))
        assert all(a.status_code == 200 for a in answers)
        predicted = [int(np.argmax({o["name"]: o for o in a.json()["outputs"]}["logits"]["data"])) for a in answers]
        assert np.mean(np.array(predicted) == labels[:40]) > 0.9
        after = samples(url)
        assert after[("mnist_dist_images_total", (("model", "mnist"), ("outcome", "labelled"), ("version", "1")))] == 40
        assert after[("mnist_dist_model_ready", (("model", "mnist"), ("version", "1")))] == 2  # one per worker
        route = (("method", "POST"), ("route", "/v2/models/{name}/infer"), ("status", "200"))
        assert after[("mnist_dist_requests_total", route)] == 40
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        assert sum(b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes() for pid in children) == 2
    finally:
        assert stop(proc) == 0


@pytest.fixture(scope="module")
def api_schema(server):
    import schemathesis

    schema = schemathesis.openapi.from_url(server[0] + "openapi.json")
    # Valid requests by the schema, and invalid ones (wrong types, values outside the enums, missing fields).
    schema.config.generation.update(modes=list(schemathesis.GenerationMode), deterministic=True)
    return schema


def fuzz(test):
    """Schemathesis over every route of the server's own OpenAPI schema: bounded, and the same examples every run."""
    import schemathesis
    from hypothesis import HealthCheck, settings

    bounded = settings(max_examples=25, deadline=None, derandomize=True, database=None,
                       suppress_health_check=list(HealthCheck))
    return schemathesis.pytest.from_fixture("api_schema").parametrize()(bounded(test))


@fuzz
def test_no_request_however_malformed_gets_a_server_error(case):
    from schemathesis.checks import not_a_server_error

    response = case.call_and_validate(checks=[not_a_server_error])
    assert "Traceback" not in response.text


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the thread's death, meant
def test_not_ready_once_the_batcher_has_died(exported_model, test_images):
    app = create_app(load(ServeOptions(str(exported_model), threads=1, runtime="onnxruntime")))

    async def probe():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                before = (await client.get("/v2/health/ready")).status_code
                batcher_of(app).stats = BrokenStats()  # a fault in the batcher's own code kills its thread
                killing = await client.post("/" + INFER, json=oip_body(test_images[0][:1]))
                for thread in batcher_of(app).threads:
                    await asyncio.to_thread(thread.join, 5)
                after = (await client.get("/v2/health/ready")).status_code
                model = (await client.get("/v2/models/mnist/ready")).status_code
                infer = await client.post("/" + INFER, json=oip_body(test_images[0][:1]))
                return before, killing, after, model, infer, (await client.get("/v2/health/live")).status_code

    before, killing, after, model, infer, live = asyncio.run(probe())
    assert (before, after, model, live) == (200, 400, 400, 200)
    assert killing.status_code == 503 and "the model stopped" in killing.json()["error"]  # answered, not left waiting
    assert infer.status_code == 503 and "not running" in infer.json()["error"]


class BrokenStats:
    def waited(self, seconds: float) -> None:
        raise RuntimeError("a bug in the batcher")
