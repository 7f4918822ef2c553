"""New model versions without downtime: a model repository in Triton's layout, driven by Triton's own client
(index, load, unload, versioned readiness and inference), swaps under load, failed loads that change nothing, poll
mode picking up what `export --repository` writes, a restricted repository API, and a repository in S3."""
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import numpy_helper

from mnist_dist.bench.predict import start_moto
from mnist_dist.data import mnist
from mnist_dist.inference import manifest as manifest_lib
from mnist_dist.inference.repository import publish_version

from conftest import ROOT, cpu_env, run, start_server, wait_for

pytestmark = pytest.mark.slow  # every test starts servers

KEY_HEADER, KEY = "admin-key", "s3cret"


@pytest.fixture(scope="module")
def images():
    pixels, labels = mnist.load_split("test")
    return (pixels[:64, None].numpy() / np.float32(255)).astype(np.float32), labels[:64].numpy()


def shifted_version(export: Path, dest: Path, shift: float) -> Path:
    """A copy of the export whose model answers differently: the logit of class 3 moved by ``shift`` (a stand-in
    for a retrained model), its manifest's hash updated."""
    dest.mkdir(parents=True)
    for name in (manifest_lib.MANIFEST, "model.onnx"):
        shutil.copy(export / name, dest / name)
    model = onnx.load(dest / "model.onnx")
    bias = next(t for t in model.graph.initializer if t.name == "out.bias")
    values = numpy_helper.to_array(bias).copy()
    values[3] += shift
    bias.CopyFrom(numpy_helper.from_array(values, "out.bias"))
    onnx.save(model, dest / "model.onnx")
    rehash(dest)
    return dest


def rehash(folder: Path) -> None:
    manifest = json.loads((folder / manifest_lib.MANIFEST).read_text())
    manifest["files"] = {"model.onnx": manifest_lib.describe_file(folder / "model.onnx")}
    (folder / manifest_lib.MANIFEST).write_text(json.dumps(manifest))


def publish(repository: Path, name: str, make) -> str:
    """A new version of ``name``, made by ``make(folder)`` in a staging folder, then renamed in whole."""
    staging = repository / name / ".staging"
    shutil.rmtree(staging, ignore_errors=True)
    make(staging)
    return publish_version(staging, repository / name).name


def onnxruntime_logits(folder: Path, images: np.ndarray) -> np.ndarray:
    session = onnxruntime.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    return session.run(None, {"images": images})[0]


def triton(url: str):
    import tritonclient.http as triton_http

    return triton_http, triton_http.InferenceServerClient(url.removeprefix("http://").rstrip("/"))


def infer(client, triton_http, images: np.ndarray, version: str = ""):
    tensor = triton_http.InferInput("images", list(images.shape), "FP32")
    tensor.set_data_from_numpy(images)
    result = client.infer("mnist", [tensor], model_version=version)
    return result.get_response()["model_version"], result.as_numpy("logits")


def stop(proc) -> None:
    proc.terminate()
    proc.wait(timeout=60)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def repository(exported_model, tmp_path_factory) -> Path:
    """mnist version 1, and mnist-int8 version 1 serving the INT8 file of the same export (its config.json)."""
    root = tmp_path_factory.mktemp("repository")
    shutil.copytree(exported_model, root / "mnist" / "1")
    shutil.copytree(exported_model, root / "mnist-int8" / "1")
    (root / "mnist-int8" / "config.json").write_text(json.dumps({"default_model_filename": "model.int8.onnx"}))
    return root


@pytest.fixture(scope="module")
def explicit(repository):
    """(base URL, process) of a server in explicit mode over the repository."""
    proc, url = start_server(None, "--model-repository", repository, "--model-control-mode", "explicit",
                             "--runtime", "onnxruntime")
    yield url, proc
    stop(proc)


def test_several_models_and_tritons_client_drives_their_versions(explicit, repository, exported_model, images):
    url, _ = explicit
    triton_http, client = triton(url)
    index = client.get_model_repository_index()
    assert {(e["name"], e["version"], e["state"]) for e in index} >= {("mnist", "1", "READY"),
                                                                       ("mnist-int8", "1", "READY")}
    int8 = httpx.post(url + "v1/predict?model=mnist-int8", json={"images": [[[0] * 28] * 28]}).json()
    assert (int8["model_name"], int8["model_version"]) == ("mnist-int8", "1")
    assert httpx.get(url + "v1/model?model=mnist-int8").json()["model"] == "model.int8.onnx"

    old = str(max(int(v) for v in client.get_model_metadata("mnist")["versions"]))
    new = publish(repository, "mnist", lambda folder: shifted_version(exported_model, folder, 4.0))
    client.load_model("mnist")
    assert client.is_model_ready("mnist", new) and not client.is_model_ready("mnist", old)
    assert client.get_model_metadata("mnist")["versions"] == [new]
    expected = onnxruntime_logits(repository / "mnist" / new, images[0])
    for version in ("", new):  # the newest by default, or named
        answered, logits = infer(client, triton_http, images[0], version)
        assert answered == new and np.abs(logits - expected).max() < 1e-4
    with pytest.raises(triton_http.InferenceServerException, match="no version"):
        infer(client, triton_http, images[0], old)
    v1 = httpx.post(url + "v1/predict", json={"images": [[[0] * 28] * 28]}).json()
    assert (v1["model_name"], v1["model_version"]) == ("mnist", new)

    client.unload_model("mnist")
    assert not client.is_model_ready("mnist") and not client.is_model_ready("mnist", new)
    with pytest.raises(triton_http.InferenceServerException, match="no model 'mnist' is loaded"):
        infer(client, triton_http, images[0])
    states = {(e["name"], e["version"]): e["state"] for e in client.get_model_repository_index()}
    assert states[("mnist", new)] == "UNAVAILABLE" and states[("mnist-int8", "1")] == "READY"
    assert client.is_server_ready()  # an unloaded model is not wanted: the server serves the others
    client.load_model("mnist")
    assert client.is_model_ready("mnist", new)
    metrics = httpx.get(url + "metrics").text
    assert f'mnist_dist_model_loads_total{{model="mnist",outcome="loaded",version="{new}"}} 2.0' in metrics
    assert f'mnist_dist_model_unloads_total{{model="mnist",version="{old}"}} 1.0' in metrics
    assert f'mnist_dist_model_ready{{model="mnist",version="{new}"}} 1.0' in metrics
    assert f'mnist_dist_model_ready{{model="mnist",version="{old}"}} 0.0' in metrics
    assert re.search(r'mnist_dist_model_load_seconds_count\{model="mnist"\} [2-9]', metrics)


def test_a_swap_under_load_answers_every_request(explicit, repository, exported_model, images):
    """32 clients keep sending while the next version is loaded and the one serving unloaded: every answer is 200,
    each names the version that gave it, none comes from the old one once the switch is seen, and each equals
    onnxruntime's for its version's file."""
    url, _ = explicit
    _, client = triton(url)
    old = str(max(int(v) for v in client.get_model_metadata("mnist")["versions"]))
    shift = 2.0 + int(old)  # a model of its own for every version
    new = publish(repository, "mnist", lambda folder: shifted_version(exported_model, folder, shift))
    expected = {v: onnxruntime_logits(repository / "mnist" / v, images[0]) for v in (old, new)}
    stopping, switched_at, answers = threading.Event(), [], []

    def one_client(seed: int) -> list:
        seen, i = [], seed
        with httpx.Client(base_url=url, timeout=30) as http:
            while not stopping.is_set():
                i = (i + 1) % len(images[0])
                sent = time.monotonic()
                body = {"inputs": [{"name": "images", "datatype": "FP32", "shape": [1, 1, 28, 28],
                                    "data": images[0][i].reshape(-1).tolist()}]}
                response = http.post("v2/models/mnist/infer", json=body)
                seen.append((sent, i, response.status_code, response.json()))
        return seen

    with ThreadPoolExecutor(32) as pool:
        clients = [pool.submit(one_client, seed) for seed in range(32)]
        time.sleep(1.0)
        client.load_model("mnist")
        switched_at.append(time.monotonic())
        time.sleep(1.0)
        stopping.set()
        answers = [c.result() for c in clients]
    flat = [a for seen in answers for a in seen]
    assert len(flat) > 100 and {status for _, _, status, _ in flat} == {200}
    for seen in answers:
        versions = [body["model_version"] for _, _, _, body in seen]
        assert set(versions) <= {old, new} and versions == sorted(versions, key=int)  # never back to the old one
    assert all(body["model_version"] == new for sent, _, _, body in flat if sent > switched_at[0])
    assert {body["model_version"] for _, _, _, body in flat} == {old, new}
    for _, i, _, body in flat:
        logits = np.array(next(o for o in body["outputs"] if o["name"] == "logits")["data"], np.float32)
        assert np.abs(logits - expected[body["model_version"]][i]).max() < 1e-4


def truncated(folder: Path) -> None:
    (folder / "model.onnx").write_bytes((folder / "model.onnx").read_bytes()[:5000])  # hash no longer matches


def garbage(folder: Path) -> None:
    (folder / "model.onnx").write_bytes(b"not an onnx file" * 100)
    rehash(folder)  # its manifest vouches for it: the runtime finds out


def bad_manifest(folder: Path) -> None:
    (folder / manifest_lib.MANIFEST).write_text("{ not json")


def wrong_input(folder: Path) -> None:
    model = onnx.load(folder / "model.onnx")
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_value = 32
    onnx.save(model, folder / "model.onnx")
    rehash(folder)


@pytest.mark.parametrize("spoil, reason", [(truncated, "sha256 mismatch"), (garbage, "cannot load"),
                                           (bad_manifest, "manifest"), (wrong_input, "input shape")])
def test_a_version_that_fails_to_load_is_a_400_and_the_one_serving_goes_on(explicit, repository, exported_model,
                                                                            images, spoil, reason):
    url, _ = explicit
    triton_http, client = triton(url)
    serving = str(max(int(v) for v in client.get_model_metadata("mnist")["versions"]))

    def spoiled(folder):
        shifted_version(exported_model, folder, 1.0)
        spoil(folder)

    bad = publish(repository, "mnist", spoiled)
    failed_before = failed_loads(url, bad)
    try:
        response = httpx.post(url + "v2/repository/models/mnist/load")
        assert response.status_code == 400 and reason in response.json()["error"], response.text
        assert f"mnist version {bad} failed to load" in response.json()["error"]
        with pytest.raises(triton_http.InferenceServerException, match=reason):
            client.load_model("mnist")
        assert client.is_model_ready("mnist", serving) and client.is_server_ready()
        assert infer(client, triton_http, images[0][:4])[0] == serving
        failed = {(e["version"], e["state"]): e["reason"] for e in client.get_model_repository_index()
                  if e["name"] == "mnist"}
        assert reason in failed[(bad, "UNAVAILABLE")]
        assert failed_loads(url, bad) == failed_before + 2  # both tries
    finally:
        shutil.rmtree(repository / "mnist" / bad)


def failed_loads(url: str, version: str) -> float:
    found = re.search(rf'mnist_dist_model_loads_total{{model="mnist",outcome="failed",version="{version}"}} (\S+)',
                      httpx.get(url + "metrics").text)
    return float(found.group(1)) if found else 0.0


def test_memory_stays_flat_across_20_loads_and_unloads(explicit):
    url, proc = explicit
    _, client = triton(url)
    levels = []
    for _ in range(20):
        client.unload_model("mnist")
        client.load_model("mnist")
        levels.append(rss_mb(proc.pid))
    assert client.is_model_ready("mnist")
    assert max(levels) - levels[0] < 30, levels


def test_the_restricted_repository_api_needs_its_key(repository):
    proc, url = start_server(None, "--model-repository", repository, "--model-control-mode", "explicit",
                             "--runtime", "onnxruntime", "--http-restricted-api",
                             f"model-repository:{KEY_HEADER}={KEY}")
    try:
        triton_http, client = triton(url)
        for call in (client.get_model_repository_index, lambda: client.load_model("mnist"),
                     lambda: client.unload_model("mnist")):
            with pytest.raises(triton_http.InferenceServerException) as refused:
                call()
            assert refused.value.status() == "403"
        assert httpx.post(url + "v2/repository/index", headers={KEY_HEADER: "wrong"}).status_code == 403
        client.load_model("mnist", headers={KEY_HEADER: KEY})
        assert client.get_model_repository_index(headers={KEY_HEADER: KEY})
        assert client.is_model_ready("mnist")  # inference and health stay open
        assert httpx.post(url + "v1/predict", json={"images": [[[0] * 28] * 28]}).status_code == 200
    finally:
        stop(proc)


def test_poll_mode_picks_up_the_version_export_writes(trained_run, exported, tmp_path):
    repository = tmp_path / "models"
    shutil.copytree(exported[0], repository / "mnist" / "1")
    proc, url = start_server(None, "--model-repository", repository, "--model-control-mode", "poll",
                             "--repository-poll-s", 0.2, "--runtime", "onnxruntime")
    try:
        exporting = subprocess.Popen([sys.executable, "-m", "mnist_dist.cli", "export", "--checkpoint", trained_run,
                                      "--repository", repository, "--name", "mnist"], cwd=ROOT, env=cpu_env(),
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        readiness = []
        while exporting.poll() is None:  # the half-written version is never taken for one
            readiness.append(httpx.get(url + "v2/health/ready").status_code)
            time.sleep(0.2)
        out, err = exporting.communicate()
        assert exporting.returncode == 0, err
        assert f"to {repository / 'mnist' / '2'}" in out and set(readiness) == {200}
        wait_for(lambda: httpx.get(url + "v2/models/mnist/versions/2/ready").status_code == 200, timeout=30)
        wait_for(lambda: httpx.get(url + "v2/models/mnist/versions/1/ready").status_code == 400, timeout=30)
        answer = httpx.post(url + "v1/predict", json={"images": [[[0] * 28] * 28]}).json()
        assert answer["model_version"] == "2"
        # A model that appears is loaded; one that goes is unloaded, and the others serve on.
        shutil.copytree(exported[0], tmp_path / "staging")
        (repository / "digits").mkdir()
        (tmp_path / "staging").rename(repository / "digits" / "1")
        wait_for(lambda: httpx.get(url + "v2/models/digits/versions/1/ready").status_code == 200, timeout=30)
        shutil.rmtree(repository / "digits")
        wait_for(lambda: httpx.get(url + "v2/models/digits/ready").status_code == 400, timeout=30)
        assert httpx.get(url + "v2/models/mnist/versions/2/ready").status_code == 200
    finally:
        stop(proc)
    assert "Not loaded" not in proc.stdout.read()


def test_a_repository_in_s3_loads_and_a_tampered_object_is_refused(repository, exported_model, images, tmp_path):
    import s3fs

    moto, endpoint = start_moto()
    aws = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_DEFAULT_REGION": "us-east-1"}
    saved = dict(os.environ)
    os.environ.update(aws)
    proc = None
    try:
        fs = s3fs.S3FileSystem(skip_instance_cache=True)
        fs.mkdir("models-bucket")
        fs.put(str(repository / "mnist" / "1") + "/", "models-bucket/repo/mnist/1/", recursive=True)
        fs.put(str(repository / "mnist-int8") + "/", "models-bucket/repo/mnist-int8/", recursive=True)
        # KServe's convention: the repository's URL in STORAGE_URI, no flag.
        proc, url = start_server(None, "--model-control-mode", "explicit", "--runtime", "onnxruntime",
                                 "--cache-dir", tmp_path / "cache",
                                 env=cpu_env(**aws, STORAGE_URI="s3://models-bucket/repo"))
        triton_http, client = triton(url)
        expected = onnxruntime_logits(repository / "mnist" / "1", images[0])
        version, logits = infer(client, triton_http, images[0])
        assert version == "1" and np.abs(logits - expected).max() < 1e-4
        # Its config.json is read in the store, before any version is copied: the first load serves its file.
        assert httpx.get(url + "v1/model?model=mnist-int8").json()["model"] == "model.int8.onnx"
        tampered = shifted_version(exported_model, tmp_path / "v2", 1.0)
        model = bytearray((tampered / "model.onnx").read_bytes())
        model[-10] ^= 0xFF  # one byte changed in the store, after the manifest was written
        (tampered / "model.onnx").write_bytes(bytes(model))
        fs.put(str(tampered) + "/", "models-bucket/repo/mnist/2/", recursive=True)
        with pytest.raises(triton_http.InferenceServerException, match="sha256 mismatch"):
            client.load_model("mnist")
        assert infer(client, triton_http, images[0][:4])[0] == "1" and client.is_server_ready()
        rehash(tampered)  # the object as published this time
        fs.put(str(tampered / "model.onnx"), "models-bucket/repo/mnist/2/model.onnx")
        fs.put(str(tampered / "manifest.json"), "models-bucket/repo/mnist/2/manifest.json")
        client.load_model("mnist")
        assert infer(client, triton_http, images[0][:4])[0] == "2"
    finally:
        if proc is not None:
            stop(proc)
        moto.kill()
        os.environ.clear()
        os.environ.update(saved)


def test_repository_errors_are_one_line(repository, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    for args, error in [(["--model-repository", empty], "holds no model"),
                        (["--model-repository", tmp_path / "missing"], "is not a folder"),
                        (["--model-repository", repository, "--version-policy", "newest"], "version policy"),
                        (["--model-repository", repository, "--http-restricted-api", "admin-key=1"],
                         "model-repository:HEADER=VALUE"),
                        (["--model-repository", repository, "--model-control-mode", "explicit", "--workers", "2"],
                         "needs --workers 1")]:
        proc = run([sys.executable, "-m", "mnist_dist.cli", "serve", *args], check=False, timeout=60)
        lines = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
        assert proc.returncode != 0 and len(lines) == 1 and error in lines[0] and "Traceback" not in proc.stderr, (
            args, proc.stderr)
