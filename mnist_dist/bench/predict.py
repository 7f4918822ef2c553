"""Benchmark of predict end to end on three kinds of input, at 1 and 2 processes, beside an earlier version.

The sets are made from the MNIST test set, so every prediction can be scored:
  * pngs:  20,000 small PNG files (28x28), the test set twice;
  * jpegs: 2,000 phone-scan-like photos, 1024x768 RGB, a dark digit on light, noisy paper;
  * npy:   one 1,000,000-row uint8 array (the test set 100 times), 784 MB on disk;
  * pngs1k: 1,000 small PNG files, the size of job a small machine takes: start-up and memory dominate.
Each run is a fresh command, as a user would start it. End to end is the command's wall time less
its start-up (the same command on a single image), the faster of two runs against the fastest of
three start-ups, the same way for every variant; peak memory is the largest resident set of any of
its processes.
"""
from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from .. import sysinfo
from ..data import mnist

SETS = {"pngs": 20_000, "jpegs": 2_000, "npy": 1_000_000, "pngs1k": 1_000, "pngs@s3": 20_000, "npy@s3": 1_000_000}
QUICK_SETS = {"pngs": 200, "jpegs": 20, "npy": 10_000, "pngs1k": 100, "pngs@s3": 50, "npy@s3": 10_000}  # smoke runs
DEFAULT_SETS = ("pngs", "jpegs", "npy", "pngs1k")
IN_S3 = "@s3"  # a set read from an S3-compatible server on loopback (moto), the same files as its local twin
BUCKET = "bench"
PHOTO = (1024, 768)
OLDEST_BASELINE = "the previous `predict` (one process, no decode threads, arrays loaded whole)"
RSS_PROBE = ("import json, resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
             "print(json.dumps({'code': code, 'max_rss_kb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}),"
             " file=sys.stderr)")


def make_sets(folder: Path, sizes: dict, s3=None) -> dict:
    """(inputs path or URL, true labels) per set, written once into ``folder`` and reused; the sets named with
    IN_S3 are uploaded to the ``s3`` file system's bucket too."""
    images, labels = (t.numpy() for t in mnist.load_split("test"))
    made = {}
    for name, n in sizes.items():
        if name.endswith(IN_S3):
            made[name] = upload(make_sets(folder, {name[: -len(IN_S3)]: n})[name[: -len(IN_S3)]], s3)
            continue
        target = folder / f"{name}-{n}"
        truth = labels[np.arange(n) % len(labels)]
        if name == "npy":
            target = folder / f"digits-{n}.npy"
            if not target.exists():
                write_big_array(target, images, n)
        elif not (target / "done").exists():
            target.mkdir(parents=True, exist_ok=True)
            rng = np.random.default_rng(0)
            for i in range(n):
                digit = images[i % len(images)]
                if name.startswith("pngs"):
                    Image.fromarray(digit).save(target / f"{i:05d}.png")
                else:
                    phone_scan(digit, rng).save(target / f"{i:05d}.jpg", quality=90)
            (target / "done").write_text("")
        made[name] = (target, truth)
    return made


def upload(local_set: tuple, s3) -> tuple:
    """The same set in the bucket: (its URL, its labels)."""
    path, truth = local_set
    key = f"{BUCKET}/{path.name}"
    if path.is_dir():
        s3.put([str(p) for p in sorted(path.glob("*.png"))], f"{key}/")
    else:
        s3.put_file(str(path), key)
    return f"s3://{key}" + ("/" if path.is_dir() else ""), truth


def start_moto(env: dict | None = None) -> tuple:
    """moto's S3 server on a free loopback port, in a process of its own (in this process it would share the GIL
    with the work it serves): (its process, its endpoint URL)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              env=dict(os.environ, **(env or {})), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while not listening(port):
        if time.monotonic() > deadline or server.poll() is not None:
            server.kill()
            raise RuntimeError("moto's server did not start")
        time.sleep(0.1)
    return server, f"http://127.0.0.1:{port}"


@contextmanager
def s3_server():
    """moto's S3 server; yields (its process, an s3fs file system). The AWS_* variables point every command
    started meanwhile at it."""
    import s3fs

    server, endpoint = start_moto()
    saved = dict(os.environ)
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                      AWS_DEFAULT_REGION="us-east-1")
    try:
        fs = s3fs.S3FileSystem(skip_instance_cache=True)
        fs.mkdir(BUCKET)
        yield server, fs
    finally:
        server.kill()
        os.environ.clear()
        os.environ.update(saved)


def listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def cpu_seconds(pid: int) -> float:
    import psutil

    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def write_big_array(path: Path, images: np.ndarray, n: int, block: int = 50_000) -> None:
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(n, *images.shape[1:]))
    for start in range(0, n, block):
        rows = np.arange(start, min(start + block, n))
        array[rows] = images[rows % len(images)]
    array.flush()


def phone_scan(digit: np.ndarray, rng) -> Image.Image:
    """A dark digit written on light, slightly uneven paper, photographed at 1024x768."""
    side = int(rng.integers(260, 420))
    ink = np.asarray(Image.fromarray(digit).resize((side, side), Image.Resampling.BICUBIC), np.float32) / 255
    paper = rng.uniform(200, 240, 3) * np.linspace(0.92, 1.0, PHOTO[0])[None, :, None]
    page = np.broadcast_to(paper, (PHOTO[1], PHOTO[0], 3)).copy()
    top, left = int(rng.integers(0, PHOTO[1] - side)), int(rng.integers(0, PHOTO[0] - side))
    page[top : top + side, left : left + side] *= (1 - 0.85 * ink)[..., None]
    page += rng.normal(0, 5, page.shape)
    return Image.fromarray(np.clip(page, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(0.8))


def timed(cmd: list, env: dict, cwd) -> tuple:
    """(wall seconds, exit code, peak RSS in MB of the largest process the command started)."""
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", RSS_PROBE, *map(str, cmd)], env=env, cwd=cwd,
                          capture_output=True, text=True)
    wall = time.perf_counter() - started
    probe = json.loads(proc.stderr.strip().splitlines()[-1])
    if probe["code"] not in (0, 2):
        raise RuntimeError(f"{cmd} failed:\n{proc.stderr[-2000:]}")
    return wall, probe["code"], probe["max_rss_kb"] / 1024


def variants(model: Path, predict_script: Path, processes: list, baseline_src) -> list:
    """(name, command prefix, extra env, cwd) for the earlier version and for each process count; "plain" is one
    process started as `mnist-dist predict`, without the launcher, as the baseline runs."""
    plain = [sys.executable, "-m", "mnist_dist.cli", "predict"]
    out = []
    if baseline_src:
        env = {"PYTHONPATH": str(Path(baseline_src).resolve())}
        out.append(("baseline, 1 process", plain, env, baseline_src))
    for n in processes:
        if n == "plain":
            out.append(("1 process, no launcher", plain, {}, None))
            continue
        several = ["--multi_gpu"] if n > 1 else []
        launch = [sys.executable, "-m", "accelerate.commands.launch", *several, "--num_processes", n,
                  "--num_machines", 1, "--mixed_precision", "no", "--dynamo_backend", "no", predict_script]
        out.append((f"{n} process{'es' if n > 1 else ''}", launch, {"ACCELERATE_USE_CPU": "1"} if n > 1 else {},
                    None))
    return [(name, [*cmd, "--model", model], env, cwd) for name, cmd, env, cwd in out]


def accuracy(csv_path: Path, truth: np.ndarray) -> float:
    with open(csv_path) as f:
        predictions = [int(row["prediction"]) if row["prediction"] else -1 for row in csv.DictReader(f)]
    return float((np.array(predictions) == truth).mean())


def benchmark(model, predict_script, work_dir, sizes: dict, processes, baseline_src=None, log=print,
              repeats: int = 2, baseline_note: str = "") -> dict:
    """Every set under every variant; the S3 sets with moto's server running (its CPU time recorded per run)."""
    if not any(name.endswith(IN_S3) for name in sizes):
        return run_benchmark(model, predict_script, Path(work_dir), sizes, processes, baseline_src, log, repeats,
                             baseline_note)
    with s3_server() as (server, s3):
        log("uploading the S3 sets to moto's server")
        return run_benchmark(model, predict_script, Path(work_dir), sizes, processes, baseline_src, log, repeats,
                             baseline_note, server, s3)


def run_benchmark(model, predict_script, work_dir: Path, sizes: dict, processes, baseline_src, log, repeats,
                  baseline_note, server=None, s3=None) -> dict:
    sets = make_sets(work_dir, sizes, s3)
    single = work_dir / "one.png"
    Image.fromarray(mnist.load_split("test")[0][0].numpy()).save(single)
    results = []
    for name, cmd, extra_env, cwd in variants(Path(model).resolve(), Path(predict_script).resolve(), processes,
                                              baseline_src):
        env = dict(os.environ, **extra_env)
        with tempfile.TemporaryDirectory() as tmp:
            startup = min(timed([*cmd, single, "--out", Path(tmp) / "one.csv"], env, cwd)[0] for _ in range(3))
            for set_name, (inputs, truth) in sets.items():
                log(f"{name}: {set_name}")
                out = Path(tmp) / f"{set_name}.csv"
                server_before = cpu_seconds(server.pid) if server else 0.0
                wall, code, rss = min(timed([*cmd, inputs, "--out", out], env, cwd) for _ in range(repeats))
                results.append({"variant": name, "set": set_name, "inputs": len(truth), "wall_s": wall,
                                "startup_s": startup, "images_per_s": len(truth) / max(wall - startup, 1e-9),
                                "peak_rss_mb": rss, "accuracy": accuracy(out, truth), "exit_code": code})
                if server and set_name.endswith(IN_S3):  # what the S3 server itself spent, over all repeats
                    results[-1]["server_cpu_s_per_run"] = (cpu_seconds(server.pid) - server_before) / repeats
                log(f"  {results[-1]['images_per_s']:.0f} images/s, peak {rss:.0f} MB, "
                    f"accuracy {100 * results[-1]['accuracy']:.2f}%")
    return {"benchmark": "predict", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": sysinfo.machine(),
            "versions": sysinfo.versions("torch", "onnxruntime", "numpy", "pillow", "accelerate", "fsspec", "s3fs",
                                         "moto"),
            "settings": {"model": str(model), "sets": sizes, "processes": processes,
                         "baseline": str(baseline_src) if baseline_src else None, "baseline_note": baseline_note,
                         "end_to_end": "wall time less the same command's start-up on one image; the faster of "
                                       f"{repeats} runs, the fastest of 3 start-ups"},
            "results": results, "speedups": speedups(results), "s3_vs_local": s3_vs_local(results)}


def s3_vs_local(results: list) -> list:
    """images/s of each S3 set over its local twin's, per variant."""
    local = {(r["variant"], r["set"]): r for r in results}
    return [{"variant": r["variant"], "set": r["set"],
             "ratio": r["images_per_s"] / local[r["variant"], r["set"][: -len(IN_S3)]]["images_per_s"]}
            for r in results if r["set"].endswith(IN_S3) and (r["variant"], r["set"][: -len(IN_S3)]) in local]


def speedups(results: list) -> list:
    base = {r["set"]: r for r in results if r["variant"].startswith("baseline")}
    return [{"variant": r["variant"], "set": r["set"],
             "vs_baseline": r["images_per_s"] / base[r["set"]]["images_per_s"]}
            for r in results if r["set"] in base and not r["variant"].startswith("baseline")]


def format_table(report: dict) -> str:
    lines = ["| set | variant | images/s end to end | vs baseline | start-up (one image) | peak RSS per process | "
             "accuracy |", "|---|---|---|---|---|---|---|"]
    ratio = {(s["variant"], s["set"]): s["vs_baseline"] for s in report["speedups"]}
    for r in sorted(report["results"], key=lambda r: list(SETS).index(r["set"])):
        vs = ratio.get((r["variant"], r["set"]))
        lines.append(f"| {r['set']} ({r['inputs']:,}) | {r['variant']} | {r['images_per_s']:,.0f} | "
                     f"{'-' if vs is None else f'{vs:.2f}x'} | {r['startup_s']:.2f} s | {r['peak_rss_mb']:,.0f} MB | "
                     f"{100 * r['accuracy']:.2f}% |")
    return "\n".join(lines)


def readme_table(reports: list) -> str:
    lines = []
    for report in reports:
        m = report["machine"]
        lines += [f"**{m['cpu']} ({m.get('cpu_capability', '?')}), {m['cores']} cores**, from {report['_source']}; "
                  f"baseline: {report['settings'].get('baseline_note') or OLDEST_BASELINE}:", "",
                  format_table(report), ""]
    return "\n".join(lines).rstrip()


def s3_table(reports: list) -> str:
    """The S3 sets beside their local twins: images/s end to end, the ratio, the server's CPU time, peak memory."""
    lines = []
    for report in reports:
        m = report["machine"]
        rows = {(r["variant"], r["set"]): r for r in report["results"]}
        lines += [f"**{m['cpu']} ({m.get('cpu_capability', '?')}), {m['cores']} cores**, from {report['_source']}; "
                  f"moto {report['versions'].get('moto', '?')}, s3fs {report['versions'].get('s3fs', '?')}:", "",
                  "| set | variant | local disk, images/s | S3 on loopback, images/s | S3 / local | S3 server CPU "
                  "per run | peak RSS per process (S3) |", "|---|---|---|---|---|---|---|"]
        for ratio in report["s3_vs_local"]:
            remote = rows[ratio["variant"], ratio["set"]]
            local = rows[ratio["variant"], ratio["set"][: -len(IN_S3)]]
            lines.append(f"| {local['set']} ({local['inputs']:,}) | {ratio['variant']} | "
                         f"{local['images_per_s']:,.0f} | {remote['images_per_s']:,.0f} | {ratio['ratio']:.2f}x | "
                         f"{remote.get('server_cpu_s_per_run', 0):.0f} s | {remote['peak_rss_mb']:,.0f} MB |")
        lines.append("")
    return "\n".join(lines).rstrip()
