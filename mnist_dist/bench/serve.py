"""Load benchmark of `mnist-dist serve` on loopback: micro-batching on and off, side by side in one run.

For each setting a fresh server is started as users start it. Then 1, 8 and 32
concurrent clients (asyncio, one keep-alive connection each, in this process)
send single-PNG requests for a fixed time after a warm-up; every answer is
checked against the label the server gave the same image when it was alone.
The load generator shares the machine with the server, as it would on a
2-core box. It uses aiohttp: httpx's async client, measured side by side on
/healthz, managed 304 requests/s at 32 connections against aiohttp's 3,847.
"""
import asyncio
import io
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from .. import sysinfo
from ..data import mnist

CLIENTS = (1, 8, 32)


def test_pngs(count: int = 100) -> list:
    pixels, _ = mnist.load_split("test")
    out = []
    for digit in pixels[:count].numpy():
        buffer = io.BytesIO()
        Image.fromarray(digit).save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


def start_server(model_dir, batching: bool, threads, src=None) -> tuple:
    """(process, base URL, seconds from the process's start to its first answered request). ``src``: the root of
    another checkout whose mnist_dist to run instead of this one (the baseline)."""
    cmd = [sys.executable, "-m", "mnist_dist.cli", "serve", "--model-dir", str(Path(model_dir).resolve()),
           "--port", "0", "--batching" if batching else "--no-batching"]
    if threads:
        cmd += ["--threads", str(threads)]
    env = dict(os.environ, PYTHONPATH=str(Path(src).resolve())) if src else None
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=src)
    assert proc.stdout is not None and proc.stderr is not None  # both are pipes
    line = proc.stdout.readline()
    match = re.search(r"http://[\d.]+:\d+/", line)
    if match is None:
        proc.kill()
        raise RuntimeError(f"the server did not start: {line}{proc.stderr.read()}")
    url = match.group(0)
    png = test_pngs(1)[0]
    while True:  # the socket is bound before the log line; the first request may still wait for the app
        try:
            if httpx.post(url + "v1/predict", files={"file": ("d.png", png)}, timeout=30).status_code == 200:
                return proc, url, time.perf_counter() - started
        except httpx.TransportError:
            time.sleep(0.005)


def peak_rss_mb(pid: int) -> float:
    """VmHWM: the largest resident set the process has had so far."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for process {pid}")


async def run_clients(url: str, pngs: list, expected: list, clients: int, seconds: float, warmup: float) -> dict:
    """Each client sends one request after another; latencies are kept only after the warm-up."""
    import aiohttp

    latencies, errors = [], []
    connector = aiohttp.TCPConnector(limit=clients)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(base_url=url, connector=connector, timeout=timeout) as http:
        started = time.perf_counter()
        measure_from, stop_at = started + warmup, started + warmup + seconds

        async def one_request(i: int) -> str:
            form = aiohttp.FormData()
            form.add_field("file", pngs[i % len(pngs)], filename="d.png", content_type="image/png")
            try:
                async with http.post("/v1/predict", data=form) as response:
                    if response.status != 200:
                        return f"status {response.status}"
                    answer = (await response.json())["results"][0]["prediction"]
                    return "" if answer == expected[i % len(pngs)] else "wrong answer"
            except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                return type(e).__name__

        async def client(worker: int) -> None:
            i = worker
            while time.perf_counter() < stop_at:
                t0 = time.perf_counter()
                error = await one_request(i)
                if t0 >= measure_from:
                    latencies.append(time.perf_counter() - t0)
                    if error:
                        errors.append(error)
                i += clients

        await asyncio.gather(*(client(w) for w in range(clients)))
    timed = np.array(latencies)
    return {"clients": clients, "requests": len(timed), "seconds": seconds,
            "requests_per_s": len(timed) / seconds, "p50_ms": 1e3 * np.percentile(timed, 50),
            "p90_ms": 1e3 * np.percentile(timed, 90), "p99_ms": 1e3 * np.percentile(timed, 99),
            "errors": len(errors), "error_examples": sorted(set(errors))[:5]}


def benchmark(model_dir, clients=CLIENTS, seconds: float = 8.0, warmup: float = 1.0, threads=None,
              baseline_src=None, log=print) -> dict:
    """Each variant is a fresh server: its start-up (to the first answer) and its peak memory after the load."""
    pngs = test_pngs()
    variants = [("current", True, None), ("current", False, None)]
    if baseline_src:
        variants.insert(0, ("baseline", True, baseline_src))
    results, startup = [], []
    for variant, batching, src in variants:
        proc, url, ready_s = start_server(model_dir, batching, threads, src)
        try:
            idle_mb = peak_rss_mb(proc.pid)
            expected = [httpx.post(url + "v1/predict", files={"file": ("d.png", png)}).json()["results"][0]
                        ["prediction"] for png in pngs]
            for n in clients:
                row = asyncio.run(run_clients(url, pngs, expected, n, seconds, warmup))
                row.update(variant=variant, batching=batching)
                row["model_runs_so_far"] = httpx.get(url + "v1/model").json()["batching"]["model_runs"]
                results.append(row)
                log(f"{variant}, batching {'on' if batching else 'off'}, {n} clients: {row['requests_per_s']:.0f} "
                    f"requests/s, p50 {row['p50_ms']:.1f} ms, p99 {row['p99_ms']:.1f} ms, {row['errors']} errors")
            info = httpx.get(url + "v1/model").json()
            startup.append({"variant": variant, "batching": batching, "ready_s": ready_s, "idle_rss_mb": idle_mb,
                            "peak_rss_mb": peak_rss_mb(proc.pid), "runtime": info["runtime"]})
            log(f"{variant}: first answer {ready_s:.2f} s after start, peak RSS {startup[-1]['peak_rss_mb']:.0f} MB "
                f"under load ({idle_mb:.0f} MB idle)")
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    return {"benchmark": "serve", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": sysinfo.machine(),
            "versions": sysinfo.versions("torch", "onnxruntime", "fastapi", "uvicorn", "aiohttp", "numpy"),
            "settings": {"model_dir": str(model_dir), "model": info["model"], "runtime": info["runtime"],
                         "clients": list(clients), "seconds": seconds, "warmup_s": warmup, "request": "one 28x28 PNG",
                         "max_batch": info["batching"]["max_batch"], "max_wait_ms": info["batching"]["max_wait_ms"],
                         "baseline": str(baseline_src) if baseline_src else None,
                         "ready": "seconds from the server process's start to its first answered POST /v1/predict",
                         "peak_rss": "VmHWM of the server process after the last load",
                         "load_generator": "aiohttp in one process on the same machine, loopback"},
            "results": results, "startup": startup}


def machine_name(report: dict) -> str:
    machine = report["machine"]
    return f"{machine['cpu']} ({machine.get('cpu_capability', '?')}), {machine['cores']} cores"


def readme_table(reports: list) -> str:
    lines = ["| machine | server | batching | clients | requests/s | p50 ms | p90 ms | p99 ms | errors |",
             "|---|---|---|---|---|---|---|---|---|"]
    for report in reports:
        for r in report["results"]:
            batching = "on" if r["batching"] else "off"
            lines.append(f"| {machine_name(report)} | {r.get('variant', '-')} | {batching} | {r['clients']} | "
                         f"{r['requests_per_s']:,.0f} | {r['p50_ms']:.1f} | {r['p90_ms']:.1f} | {r['p99_ms']:.1f} | "
                         f"{r['errors']} |")
    startup = [(report, s) for report in reports for s in report.get("startup", [])]
    if startup:
        lines += ["", "| machine | server | batching | first answer after start | peak RSS idle | peak RSS under load "
                      "| runtime |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {machine_name(report)} | {s['variant']} | {'on' if s['batching'] else 'off'} | "
                  f"{s['ready_s']:.2f} s | {s['idle_rss_mb']:.0f} MB | {s['peak_rss_mb']:.0f} MB | {s['runtime']} |"
                  for report, s in startup]
    sources = ", ".join(r["_source"] for r in reports)
    lines += ["", f"Generated by `jobs/perf_table.py` from {sources}: `jobs/bench_serve.py`, single-PNG requests on "
              "loopback, the load generator on the same machine."]
    return "\n".join(lines)
