"""Load benchmark of `mnist-dist serve` on loopback, beside a bare FastAPI endpoint, in one run.

Every server is a fresh process, started as users start it, and all of them
run side by side. Then 1, 8 and 32 concurrent clients (asyncio, one keep-alive
connection each, in this process) send one-image requests for a fixed time
after a warm-up; every answer is checked against the image's label as the
server gave it alone. The settings take turns, server after server, for
several rounds, and each row is the round with the median throughput: on a
shared machine one measurement of a setting can be a third off the next, and
a ratio of two single measurements is no ratio at all. Requests are
encoded once, before the clock starts, so the load generator does the same
small work per request for every row. It shares the machine with the server,
as it would on a 2-core box; the bare endpoint (``bench.bare``: read the body,
return a constant) measures the framework's ceiling under the same load, and
the server's rows are read as shares of it. ``bench.load`` drives the load:
raw HTTP/1.1 on uvloop, a quarter of aiohttp's CPU a request (see there),
since every core it takes is one the server under test loses; each row
records what the generator and the server each spent a request.

Rows: the bare endpoint, with one process and with two; the server's /v1 API
(one PNG as multipart), the Open Inference Protocol with binary and with JSON
tensors; micro-batching off at 1 client; ``--workers 2`` against 1 (and
against the bare endpoint's two); and an overload row, 256 clients against
``--max-queue 64``, that counts 200/503/504 and the server's peak memory;
and a swap row: 32 clients, steady and while a new model version goes live
every 2 s (explicit mode), in turns on one server.
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from .. import sysinfo
from ..data import mnist
from .load import drive
from .predict import cpu_seconds

CLIENTS = (1, 8, 32)
KINDS = ("v1-png", "oip-binary", "oip-json")
BOUNDARY = "mnist-dist-bench"
OVERLOAD = {"clients": 256, "max_queue": 64}


def test_digits(count: int = 100) -> tuple:
    """(uint8 pixels [count, 28, 28], labels) of the first test images."""
    pixels, labels = mnist.load_split("test")
    return pixels[:count].numpy(), labels[:count].numpy()


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def encode(kind: str, pixels: np.ndarray) -> tuple:
    """(path, headers, body) of one request carrying one image, of the given kind."""
    if kind in ("v1-png", "bare"):
        part = (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="d.png"\r\n'
                f"Content-Type: image/png\r\n\r\n").encode() + png(pixels) + f"\r\n--{BOUNDARY}--\r\n".encode()
        path = "/echo" if kind == "bare" else "/v1/predict"
        return path, {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}, part
    tensor = (pixels[None, None] / np.float32(255)).astype("<f4")
    spec: dict = {"name": "images", "datatype": "FP32", "shape": list(tensor.shape)}
    if kind == "oip-binary":
        spec["parameters"] = {"binary_data_size": tensor.nbytes}
        header = json.dumps({"inputs": [spec], "parameters": {"binary_data_output": True}}).encode()
        return ("/v2/models/mnist/infer", {"Inference-Header-Content-Length": str(len(header)),
                                           "Content-Type": "application/octet-stream"}, header + tensor.tobytes())
    spec["data"] = tensor.reshape(-1).tolist()
    return "/v2/models/mnist/infer", {"Content-Type": "application/json"}, json.dumps({"inputs": [spec]}).encode()


def prediction(kind: str, body: bytes, split: int | None) -> int | None:
    """The class the server answered, from any kind of response (None for the bare endpoint); ``split``: its
    Inference-Header-Content-Length, if any."""
    if kind == "bare":
        return None
    if kind == "v1-png":
        return json.loads(body)["results"][0]["prediction"]
    split = len(body) if split is None else split
    outputs = {o["name"]: o for o in json.loads(body[:split])["outputs"]}
    logits = outputs["logits"]
    if "data" in logits:
        return int(np.argmax(logits["data"]))
    offset = split
    for o in json.loads(body[:split])["outputs"]:  # binary outputs follow the JSON in the order listed
        size = o["parameters"]["binary_data_size"]
        if o["name"] == "logits":
            return int(np.frombuffer(body[offset : offset + size], "<f4").argmax())
        offset += size
    raise ValueError("no logits in the answer")


def start(cmd: list, env=None, cwd=None) -> tuple:
    """(process, base URL, seconds from the process's start to readiness) of a server that prints its URL."""
    started = time.perf_counter()
    # The server's warnings and errors go where this process's go: a pipe nobody reads would fill and stall it.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env, cwd=cwd)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    match = re.search(r"http://[\d.]+:\d+/", line)
    if match is None:
        proc.kill()
        raise RuntimeError(f"the server did not start (its errors are above): {line}")
    return proc, match.group(0), started


def wait_ready(url: str, probe: str, started: float) -> float:
    while True:  # the socket is bound before the log line; readiness comes after the warm-up
        try:
            if httpx.get(url + probe, timeout=30).status_code in (200, 405):
                return time.perf_counter() - started
        except httpx.TransportError:
            pass
        time.sleep(0.005)


def start_server(model_dir, batching: bool = True, threads=None, src=None, extra=()) -> tuple:
    """(process, base URL, seconds to ready). ``src``: another checkout whose mnist_dist runs instead (baseline).
    ``model_dir``: an export folder, or a model repository."""
    served = "--model-dir" if (Path(model_dir) / "manifest.json").is_file() else "--model-repository"
    cmd = [sys.executable, "-m", "mnist_dist.cli", "serve", served, str(Path(model_dir).resolve()),
           "--port", "0", "--batching" if batching else "--no-batching", *extra]
    if threads:
        cmd += ["--threads", str(threads)]
    env = dict(os.environ, PYTHONPATH=str(Path(src).resolve())) if src else None
    proc, url, started = start(cmd, env, src)
    return proc, url, wait_ready(url, "v2/health/ready" if src is None else "healthz", started)


def start_bare(workers: int = 1) -> tuple:
    proc, url, started = start([sys.executable, "-m", "mnist_dist.bench.bare", "--port", "0",
                                "--workers", str(workers)])
    return proc, url, wait_ready(url, "echo", started)


def peak_rss_mb(pid: int) -> float:
    """VmHWM: the largest resident set the process has had so far."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for process {pid}")


def children_of(pid: int) -> list:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def tree_peak_rss_mb(pid: int) -> float:
    """The peak of a server and its worker processes, added up."""
    return peak_rss_mb(pid) + sum(peak_rss_mb(c) for c in children_of(pid))


def tree_cpu_s(pid: int) -> float:
    """CPU seconds (user and system) a server and its worker processes have used so far."""
    return sum(cpu_seconds(process) for process in [pid, *children_of(pid)])


def run_clients(url: str, kind: str, requests: list, expected: list, clients: int, seconds: float, warmup: float,
                pid: int | None = None) -> dict:
    """Each client sends one request after another; latencies and statuses are kept only after the warm-up. With
    ``pid``, the server's CPU time (its workers' too) over the same time, per request."""
    import uvloop

    refusals: dict = {}  # status -> the first body of that status: why the server refused

    def check(i: int, status: int, body: bytes, split: int | None) -> str:
        if status != 200:
            refusals.setdefault(str(status), body[:200].decode("utf-8", "replace"))
            return ""
        return "" if prediction(kind, body, split) == expected[i % len(requests)] else "wrong answer"

    meters = {"server": lambda: tree_cpu_s(pid)} if pid else {}
    tally = uvloop.run(drive(url, requests, check, clients, seconds, warmup, meters))
    statuses = [status for _, status in tally.latencies]
    ok = np.array([t for t, status in tally.latencies if status == 200] or [np.nan])
    counts = {str(s): statuses.count(s) for s in sorted(set(statuses))}
    answered = max(1, len(statuses))
    row = {"kind": kind, "clients": clients, "requests": len(statuses), "seconds": seconds,
           "requests_per_s": counts.get("200", 0) / seconds, "p50_ms": 1e3 * float(np.percentile(ok, 50)),
           "p90_ms": 1e3 * float(np.percentile(ok, 90)), "p99_ms": 1e3 * float(np.percentile(ok, 99)),
           "statuses": counts, "errors": len(tally.errors) + sum(n for s, n in counts.items() if s != "200"),
           "error_examples": sorted(set(tally.errors))[:5], "refusal_examples": refusals}
    row.update({f"{name}_cpu_us_per_request": 1e6 * spent / answered for name, spent in tally.cpu_s.items()})
    return row


def described(row: dict) -> str:
    """One measured row as the benchmark logs it."""
    return (f"{row['server']}, {row['kind']}, batching {'on' if row['batching'] else 'off'}, {row['workers']} "
            f"worker(s), {row['clients']} clients: {row['requests_per_s']:.0f} requests/s, p50 {row['p50_ms']:.1f} ms, "
            f"p99 {row['p99_ms']:.1f} ms, statuses {row['statuses']}")


def answers_alone(url: str, kind: str, requests: list) -> list:
    answers = []
    for path, headers, body in requests:
        response = httpx.post(url + path.lstrip("/"), content=body, headers=headers, timeout=30)
        split = response.headers.get("inference-header-content-length")
        answers.append(prediction(kind, response.content, None if split is None else int(split)))
    return answers


def benchmark(model_dir, clients=CLIENTS, seconds: float = 5.0, warmup: float = 1.0, threads=None,
              baseline_src=None, log=print, rounds: int = 3) -> dict:
    pixels, _ = test_digits()
    runs: list = []  # (server, label, [(kind, clients)]): every server running, as they are measured in turn
    try:
        runs.append((start_bare(), {"server": "bare FastAPI"}, [("bare", n) for n in clients]))
        runs.append((start_bare(workers=2), {"server": "bare FastAPI", "workers": 2}, [("bare", max(clients))]))
        if baseline_src:
            runs.append((start_server(model_dir, True, threads, baseline_src), {"server": "baseline"},
                         [(kind, n) for kind in ("v1-png", "oip-binary") for n in clients]))
        runs.append((start_server(model_dir, True, threads), {"server": "mnist-dist"},
                     [(kind, n) for kind in KINDS for n in clients]))
        runs.append((start_server(model_dir, False, threads), {"server": "mnist-dist", "batching": False},
                     [("v1-png", 1), ("oip-binary", 1)]))
        runs.append((start_server(model_dir, True, threads, extra=["--workers", "2"]),
                     {"server": "mnist-dist", "workers": 2}, [("oip-binary", max(clients)), ("v1-png", max(clients))]))
        results, startup, info = in_rounds(runs, pixels, seconds, warmup, rounds, log)
    finally:
        for (proc, _, _), _, _ in runs:
            proc.terminate()
            proc.wait(timeout=60)
    overload = overload_row(model_dir, pixels, seconds, warmup, threads, log)
    swap = swap_row(model_dir, pixels, seconds, warmup, threads, rounds, log)
    return {"benchmark": "serve", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": sysinfo.machine(),
            "versions": sysinfo.versions("torch", "onnxruntime", "fastapi", "starlette", "uvicorn", "uvloop",
                                         "httptools", "numpy", "prometheus-client", "orjson"),
            "settings": {"model_dir": str(model_dir), "runtime": info["runtime"], "clients": list(clients),
                         "seconds": seconds, "warmup_s": warmup, "rounds": rounds,
                         "max_batch": info["batching"]["max_batch"], "max_wait_ms": info["batching"]["max_wait_ms"],
                         "baseline": str(baseline_src) if baseline_src else None,
                         "request": "one 28x28 image: a PNG as multipart (v1-png and bare), FP32 [1,1,28,28] "
                                    "(oip-binary: raw bytes after the JSON header; oip-json: a JSON list)",
                         "row": "of each setting's rounds (all servers running, the settings in turn), the one with "
                                "the median requests/s; requests_per_s_rounds lists them all",
                         "ready": "seconds from the server process's start to its first ready answer",
                         "peak_rss": "VmHWM of the server process (and its workers, added up)",
                         "load_generator": "bench.load: raw HTTP/1.1 on uvloop, in one process on the same "
                                           "machine, loopback; its CPU per request is in each row"},
            "results": results, "startup": startup, "overload": overload, "swap": swap}


def in_rounds(runs: list, pixels: np.ndarray, seconds: float, warmup: float, rounds: int, log) -> tuple:
    """(result rows, start-up rows, the server's /v1/model) of the settings of every running server, measured in
    turn ``rounds`` times; each row is its setting's median round."""
    requests = {kind: [encode(kind, p) for p in pixels] for kind in ("bare", *KINDS)}
    expected = {}
    for i, ((_, url, _), _, plan) in enumerate(runs):
        for kind in {kind for kind, _ in plan}:
            expected[i, kind] = [None] * len(pixels) if kind == "bare" else answers_alone(url, kind, requests[kind])
    idle_mb = [tree_peak_rss_mb(proc.pid) for (proc, _, _), _, _ in runs]
    measured: dict = {}
    for round_ in range(rounds):
        for i, ((proc, url, _), label, plan) in enumerate(runs):
            for kind, n in plan:
                row = {"batching": True, "workers": 1, **label,
                       **run_clients(url, kind, requests[kind], expected[i, kind], n, seconds, warmup, proc.pid)}
                measured.setdefault((i, kind, n), []).append(row)
                log(f"round {round_ + 1}/{rounds}: {described(row)}")
    results = [median_round(rows) for rows in measured.values()]
    startup = [{"server": label["server"], "batching": label.get("batching", True), "workers": label.get("workers", 1),
                "ready_s": ready_s, "idle_rss_mb": idle, "peak_rss_mb": tree_peak_rss_mb(proc.pid)}
               for ((proc, _, ready_s), label, _), idle in zip(runs, idle_mb)]
    main = next(url for (_, url, _), label, _ in runs if label == {"server": "mnist-dist"})
    return results, startup, httpx.get(main + "v1/model").json()


def median_round(rows: list) -> dict:
    """The round with the median requests/s (the lower middle of an even count), and every round's requests/s."""
    ordered = sorted(rows, key=lambda row: row["requests_per_s"])
    return {**ordered[(len(ordered) - 1) // 2], "requests_per_s_rounds": [row["requests_per_s"] for row in rows]}


def overload_row(model_dir, pixels, seconds, warmup, threads, log) -> dict:
    """256 clients against --max-queue 64: every answer 200, 503 or 504, and the memory flat."""
    proc, url, _ = start_server(model_dir, True, threads, extra=["--max-queue", str(OVERLOAD["max_queue"])])
    try:
        idle_mb = peak_rss_mb(proc.pid)
        requests = [encode("oip-binary", p) for p in pixels]
        row = {"server": "mnist-dist", "batching": True, "workers": 1, "max_queue": OVERLOAD["max_queue"],
               **run_clients(url, "oip-binary", requests, answers_alone(url, "oip-binary", requests),
                             OVERLOAD["clients"], seconds, warmup, proc.pid)}
        log(described(row))
        row.update(idle_rss_mb=idle_mb, peak_rss_mb=peak_rss_mb(proc.pid))
        total = max(1, row["requests"])
        row["shares"] = {status: n / total for status, n in row["statuses"].items()}
        log(f"overload: {row['shares']}, p99 of the 200s {row['p99_ms']:.1f} ms, peak RSS {row['peak_rss_mb']:.0f} MB "
            f"({idle_mb:.0f} MB idle)")
        return row
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def machine_name(report: dict) -> str:
    machine = report["machine"]
    return f"{machine['cpu']} ({machine.get('cpu_capability', '?')}), {machine['cores']} cores"


def ratios(report: dict) -> dict:
    """The targets, as shares measured in the same run."""
    rows = report["results"]

    def rate(kind, clients, batching=True, workers=1, field="requests_per_s"):
        for r in rows:
            if r["server"] in ("bare FastAPI", "mnist-dist") and "max_queue" not in r and \
                    (r["kind"], r["clients"], r["batching"], r["workers"]) == (kind, clients, batching, workers):
                return r[field]
        return float("nan")

    top = max(report["settings"]["clients"])
    bare, bare_p99 = rate("bare", top), rate("bare", top, field="p99_ms")
    bare_2 = rate("bare", top, workers=2)
    return {f"oip-binary / bare at {top} clients": rate("oip-binary", top) / bare,
            f"v1-png / bare at {top} clients": rate("v1-png", top) / bare,
            f"2 workers each: oip-binary / bare at {top} clients": rate("oip-binary", top, workers=2) / bare_2,
            f"2 workers each: v1-png / bare at {top} clients": rate("v1-png", top, workers=2) / bare_2,
            f"oip-binary p99 / bare p99 at {top} clients": rate("oip-binary", top, field="p99_ms") / bare_p99,
            f"v1-png p99 / bare p99 at {top} clients": rate("v1-png", top, field="p99_ms") / bare_p99,
            "v1-png at 1 client, batching on / off": rate("v1-png", 1) / rate("v1-png", 1, False),
            "oip-binary at 1 client, batching on / off": rate("oip-binary", 1) / rate("oip-binary", 1, False),
            f"oip-binary at {top} clients, 2 workers / 1": rate("oip-binary", top, workers=2) / rate("oip-binary", top)}


def cpu_cell(row: dict, meter: str) -> str:
    value = row.get(f"{meter}_cpu_us_per_request")
    return "-" if value is None else f"{value:,.0f}"


def readme_table(reports: list) -> str:
    lines = ["| machine | server | request | batching | workers | clients | requests/s | p50 ms | p99 ms | errors "
             "| server CPU us/request | load generator CPU us/request |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for report in reports:
        for r in report["results"]:
            lines.append(f"| {machine_name(report)} | {r.get('server', r.get('variant', '-'))} | "
                         f"{r.get('kind', 'v1-png')} | {'on' if r['batching'] else 'off'} | {r.get('workers', 1)} | "
                         f"{r['clients']} | {r['requests_per_s']:,.0f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
                         f"{r['errors']} | {cpu_cell(r, 'server')} | {cpu_cell(r, 'load_generator')} |")
    measured = [r for r in reports if "overload" in r]
    if measured:
        lines += ["", "| machine | ratio (same run) | value |", "|---|---|---|"]
        lines += [f"| {machine_name(r)} | {name} | {value:.2f}x |"
                  for r in measured for name, value in ratios(r).items()]
        lines += ["", "| machine | overload | 200 | 503 | 504 | other | p99 of the 200s | peak RSS idle → loaded |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in measured:
            o, shares = r["overload"], r["overload"]["shares"]
            other = 1 - sum(shares.get(s, 0) for s in ("200", "503", "504"))
            lines.append(f"| {machine_name(r)} | {o['clients']} clients, --max-queue {o['max_queue']} | "
                         f"{shares.get('200', 0):.0%} | {shares.get('503', 0):.0%} | {shares.get('504', 0):.0%} | "
                         f"{other:.0%} | {o['p99_ms']:.1f} ms | {o['idle_rss_mb']:.0f} → {o['peak_rss_mb']:.0f} MB |")
    startup = [(report, s) for report in reports for s in report.get("startup", [])]
    if startup:
        lines += ["", "| machine | server | batching | workers | ready after start | peak RSS idle | peak RSS "
                      "under load |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {machine_name(report)} | {s.get('server', s.get('variant'))} | "
                  f"{'on' if s['batching'] else 'off'} | {s.get('workers', 1)} | {s['ready_s']:.2f} s | "
                  f"{s['idle_rss_mb']:.0f} MB | "
                  f"{s['peak_rss_mb']:.0f} MB |" for report, s in startup]
    sources = ", ".join(r["_source"] for r in reports)
    lines += ["", f"Generated by `jobs/perf_table.py` from {sources}: `jobs/bench_serve.py`, one-image requests on "
              "loopback, the load generator on the same machine. The model ran in: "
              + "; ".join(f"{machine_name(r)}: {r['settings']['runtime']}" for r in reports) + "."]
    return "\n".join(lines)


SWAP_CLIENTS, SWAP_EVERY_S = 32, 2.0
# Rounds of the swap row, at least: a swap costs a fraction of a core for a tenth of a second, less than two rounds
# of one setting differ by on a shared 2-core machine (up to 15% measured), so more rounds are needed for a median.
SWAP_ROUNDS = 5


def swap_row(model_dir, pixels, seconds, warmup, threads, rounds, log) -> dict:
    """32 clients against a server in explicit mode, steady and while a new version is loaded (and the one serving
    unloaded) every ``SWAP_EVERY_S``, in turns: each the median of its rounds, from the same server."""
    import tempfile
    import threading

    with tempfile.TemporaryDirectory(prefix="mnist-dist-swap-") as root:
        repository = Path(root)
        add_version(model_dir, repository, 1)
        proc, url, _ = start_server(repository, True, threads, extra=["--model-control-mode", "explicit"])
        try:
            requests = [encode("oip-binary", p) for p in pixels]
            expected = answers_alone(url, "oip-binary", requests)
            measured: dict = {"steady": [], "swapping": []}
            version = 1
            rounds = max(rounds, SWAP_ROUNDS)
            for round_ in range(rounds):
                for phase in measured:
                    stop, swaps = threading.Event(), list[int]()
                    swapper = threading.Thread(target=swap_until, args=(model_dir, repository, url, version, stop,
                                                                        swaps)) if phase == "swapping" else None
                    if swapper:
                        swapper.start()
                    row = run_clients(url, "oip-binary", requests, expected, SWAP_CLIENTS, seconds, warmup,
                                      proc.pid)
                    if swapper:
                        stop.set()
                        swapper.join()
                        version = swaps[-1] if swaps else version
                    row.update(phase=phase, swaps=len(swaps))
                    measured[phase].append(row)
                    log(f"round {round_ + 1}/{rounds}: {phase}: {row['requests_per_s']:.0f} requests/s, p99 "
                        f"{row['p99_ms']:.1f} ms, statuses {row['statuses']}, {len(swaps)} version switches")
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    steady, swapping = (median_round(rows) for rows in measured.values())
    return {"clients": SWAP_CLIENTS, "every_s": SWAP_EVERY_S, "steady": steady, "swapping": swapping,
            "requests_ratio": swapping["requests_per_s"] / steady["requests_per_s"],
            "p99_ratio": swapping["p99_ms"] / steady["p99_ms"],
            "errors": sum(row["errors"] for row in measured["swapping"]),
            "switches": sum(row["swaps"] for row in measured["swapping"])}


def add_version(model_dir, repository: Path, version: int) -> None:
    """The export's ONNX file and manifest as version ``version`` of mnist: staged, then renamed in."""
    staging = repository / "mnist" / f".{version}.tmp"
    staging.mkdir(parents=True)
    for name in ("manifest.json", "model.onnx"):
        try:
            os.link(Path(model_dir) / name, staging / name)  # no copy to cost the measured machine anything
        except OSError:  # another file system
            shutil.copyfile(Path(model_dir) / name, staging / name)
    staging.rename(repository / "mnist" / str(version))


def swap_until(model_dir, repository: Path, url: str, version: int, stop, swaps: list) -> None:
    """Every SWAP_EVERY_S, the next version written and loaded (Triton's load: the new one in, then the old one
    out), until ``stop``."""
    while not stop.wait(SWAP_EVERY_S):
        version += 1
        add_version(model_dir, repository, version)
        response = httpx.post(f"{url}v2/repository/models/mnist/load", timeout=60)
        response.raise_for_status()
        swaps.append(version)


def swap_table(reports: list) -> str:
    """Requests/s and p99 while versions switch, against steady state; and this server's rows against the previous
    version's (the baseline), all from the same run."""
    lines = ["| machine | version switches | clients | requests/s steady → swapping | ratio | p99 ms steady → swapping "
             "| ratio | errors |", "|---|---|---|---|---|---|---|---|"]
    for r in reports:
        s = r["swap"]
        lines.append(f"| {machine_name(r)} | {s['switches']}, one every {s['every_s']:g} s | {s['clients']} | "
                     f"{s['steady']['requests_per_s']:,.0f} → {s['swapping']['requests_per_s']:,.0f} | "
                     f"{s['requests_ratio']:.2f}x | {s['steady']['p99_ms']:.1f} → {s['swapping']['p99_ms']:.1f} | "
                     f"{s['p99_ratio']:.2f}x | {s['errors']} |")
    lines += ["", "| machine | request | clients | requests/s previous → this | ratio | p99 ms previous → this |",
              "|---|---|---|---|---|---|"]
    for r in reports:
        rows = {(row["server"], row["kind"], row["clients"]): row for row in r["results"]
                if row["batching"] and row["workers"] == 1}
        for (server, kind, clients), base in rows.items():
            this = rows.get(("mnist-dist", kind, clients))
            if server == "baseline" and this:
                ratio = this["requests_per_s"] / base["requests_per_s"]
                lines.append(f"| {machine_name(r)} | {kind} | {clients} | {base['requests_per_s']:,.0f} → "
                             f"{this['requests_per_s']:,.0f} | {ratio:.2f}x | {base['p99_ms']:.1f} → "
                             f"{this['p99_ms']:.1f} |")
    sources = ", ".join(r["_source"] for r in reports)
    lines += ["", f"Generated by `jobs/perf_table.py` from {sources}: `jobs/bench_serve.py --baseline-src` (the "
              "previous version's checkout), medians of each setting's rounds, the settings taking turns."]
    return "\n".join(lines)
