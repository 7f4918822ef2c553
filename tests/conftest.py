"""Shared fixtures: real MNIST (the copy bundled in the package), a CLI runner, and one short-trained run."""
import hashlib
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from mnist_dist.data import mnist

ROOT = Path(__file__).resolve().parents[1]


# Fixtures that train, export or quantize a model: every test that uses one is in the slow tier. Tests that launch
# jobs, start servers or build environments are marked `slow` where they are written.
SLOW_FIXTURES = {"trained_run", "run_copy", "exported", "exported_model"}


def pytest_collection_modifyitems(items) -> None:
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True, scope="session")
def bundled_data_only():
    """Every test, and every job it starts, reads the MNIST bundled in the package unless it says otherwise."""
    os.environ.pop(mnist.DATA_DIR_ENV, None)


@pytest.fixture(scope="session")
def mnist_root(tmp_path_factory) -> Path:
    """The bundled MNIST written out as a torchvision root, for tests that need files on disk."""
    return mnist.write_raw_files(tmp_path_factory.mktemp("mnist_root"), mnist.Source(None, "bundled"))


def cpu_env(**extra) -> dict:
    """Environment for child processes: the bundled MNIST, unbuffered output, the CPU even if a GPU is present."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="")
    env.pop(mnist.DATA_DIR_ENV, None)
    env.update(extra)
    return env


def run(args, timeout=600, env=None, check=True, cwd=ROOT) -> subprocess.CompletedProcess:
    """Run a command as a user would; on an unexpected exit code, show its output."""
    proc = subprocess.run([str(a) for a in args], cwd=cwd, env=env or cpu_env(), capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
    return proc


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def root_cause_exit_code(launcher_stderr: str) -> int:
    """The exit code of the first process that failed, from torchrun's failure report: the launcher itself exits 1
    whatever its processes' codes were."""
    found = re.search(r"Root Cause.*?exitcode\s*:\s*(-?\d+)", launcher_stderr, re.S)
    assert found, launcher_stderr[-3000:]
    return int(found.group(1))


def sigkill_when(args, should_kill) -> int:
    """Start a command, SIGKILL it at the first stdout line for which should_kill(line) is true; return its exit
    code."""
    proc = subprocess.Popen([str(a) for a in args], cwd=ROOT, env=cpu_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        for line in proc.stdout:
            if should_kill(line):
                proc.send_signal(signal.SIGKILL)
                break
        return proc.wait(timeout=60)
    finally:
        proc.kill()


def train_job(*args, **kwargs) -> subprocess.CompletedProcess:
    return run([sys.executable, "jobs/train.py", *args], **kwargs)


def accelerate_launch(*args, **kwargs) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "accelerate.commands.launch", *args], **kwargs)


def launch_cmd(script: str, *args, processes: int = 2, restarts: int = 0) -> list:
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", processes,
            "--num_machines", 1, "--mixed_precision", "no", "--dynamo_backend", "no", "--max_restarts", restarts,
            script, *args]


def wait_for(condition, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def file_hashes(folder: Path) -> dict:
    return {p.relative_to(folder): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """One epoch of 400 batches with the tutorial recipe: a real, decent checkpoint (~98%). Label smoothing makes
    its plain softmax under-confident, as the presets' is, and a weight average is what it exports."""
    out = tmp_path_factory.mktemp("trained") / "run"
    train_job("--output-dir", out, "--preset", "tutorial", "--epochs", 1, "--limit-batches", 400,
              "--label-smoothing", 0.1, "--ema", 0.99)
    return out


@pytest.fixture
def run_copy(trained_run, tmp_path) -> Path:
    """A private copy of the trained run, for tests that write into a run dir."""
    dest = tmp_path / "run"
    shutil.copytree(trained_run, dest)
    return dest


@pytest.fixture(scope="session")
def exported(trained_run, tmp_path_factory):
    """The trained run exported through the script users run: (folder, completed process)."""
    out = tmp_path_factory.mktemp("export") / "model"
    proc = run([sys.executable, "export/export.py", "--checkpoint", trained_run, "--out-dir", out])
    return out, proc


@pytest.fixture(scope="session")
def exported_model(exported, tmp_path_factory) -> Path:
    """A private copy of the export with an INT8 model added (mnist-dist quantize)."""
    out = tmp_path_factory.mktemp("quantized") / "model"
    shutil.copytree(exported[0], out)
    run([sys.executable, "-m", "mnist_dist.cli", "quantize", out, "--calibration-images", 500])
    return out


def write_test_pngs(folder: Path, count: int, name: str = "digit_{:04d}.png") -> list:
    """The first ``count`` MNIST test digits as 28x28 PNG files in ``folder``; returns their labels."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    pixels, labels = mnist.load_split("test")
    for i in range(count):
        Image.fromarray(pixels[i].numpy()).save(folder / name.format(i))
    return labels[:count].tolist()


def png_bytes(pixels: np.ndarray, **options) -> bytes:
    """``pixels`` as a PNG file's bytes (``options``: Pillow's PNG options, compress_level, exif, ...)."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", **options)
    return buffer.getvalue()


def locked_versions(lock: Path) -> dict:
    """{package: version} from a lock of ``name==version ; marker`` lines, for this interpreter."""
    pins = {}
    for line in lock.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate():
                (spec,) = requirement.specifier
                pins[canonicalize_name(requirement.name)] = spec.version
    return pins


def skip_unless_required(reason: str) -> None:
    """Skip a test whose optional piece (an extra, a browser) is missing, except where $MNIST_DIST_REQUIRE_ALL is
    set, as CI sets it: there every test must run, and a missing piece fails it."""
    if os.environ.get("MNIST_DIST_REQUIRE_ALL"):
        pytest.fail(f"required here ($MNIST_DIST_REQUIRE_ALL): {reason}")
    pytest.skip(reason, allow_module_level=True)


def cpu_flags() -> set:
    """This CPU's feature flags as the kernel lists them (the source `lscpu` reads), independent of torch."""
    if platform.machine() != "x86_64" or not Path("/proc/cpuinfo").is_file():
        pytest.skip("the rule is checked against x86 flags from /proc/cpuinfo")
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def start_server(model_dir, *args, env=None) -> tuple:
    """A real server on loopback, started as users start it, and ready: (process, base URL). ``model_dir``: an
    export folder, or None when ``args`` say what to serve."""
    import httpx

    served = ["--model-dir", str(model_dir)] if model_dir is not None else []
    proc = subprocess.Popen([sys.executable, "-m", "mnist_dist.cli", "serve", *served, "--port", "0", "--threads", "1",
                             *map(str, args)], cwd=ROOT, env=env or cpu_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    match = re.search(r"http://[\d.]+:\d+/", line)
    if match is None:
        proc.kill()
        pytest.fail(f"the server did not start: {line}{proc.stderr.read()}")
    url = match.group(0)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "v2/health/ready").status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    proc.kill()
    pytest.fail("the server never became ready")


def calibrated_softmax(logits, temperature: float) -> np.ndarray:
    """softmax(logits / temperature), written here from its definition, for checking what the package computes."""
    scaled = np.asarray(logits, np.float64) / temperature
    exp = np.exp(scaled - scaled.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


def ece_15_bins(probabilities, labels) -> float:
    """Expected calibration error over the 15 equal-width bins (b/15, (b+1)/15], from its definition."""
    confidence = probabilities.max(1)
    right = probabilities.argmax(1) == labels
    total = 0.0
    for b in range(15):
        members = (confidence > b / 15) & (confidence <= (b + 1) / 15)
        if members.any():
            total += members.sum() * abs(right[members].mean() - confidence[members].mean())
    return total / len(labels)
