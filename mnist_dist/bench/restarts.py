"""How reliably a predict job heals: 2 gloo processes under `accelerate launch --max_restarts 3` over an array,
one worker SIGKILLed twice, run after run, beside an earlier checkout in the same invocation.

Each run counts as clean when the launcher exits 0 and the output has the bytes of an uninterrupted run.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .. import sysinfo

KILL_AT_PARTS = (6, 12)  # finished chunks when the first and the second worker is killed
CHUNK = 2048
HUNG_AFTER_S = 120.0  # an uninterrupted run takes about 30 s on 2 cores, a restarted one 35-40


def launch(src: Path, restarts: int = 0) -> list:
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--max_restarts", str(restarts),
            str(src / "jobs" / "predict.py")]


def job_env(src: Path) -> dict:
    """The environment of a job of the checkout ``src``: its own mnist_dist first on the path, on the CPU."""
    return dict(os.environ, PYTHONPATH=str(src), ACCELERATE_USE_CPU="1", CUDA_VISIBLE_DEVICES="")


def write_array(folder: Path, rows: int) -> Path:
    from ..data import mnist

    test = mnist.load_split("test")[0].numpy()
    path = folder / "digits.npy"
    np.save(path, np.concatenate([test] * -(-rows // len(test)))[:rows])
    return path


def killed_run(src: Path, args: list, out: Path) -> dict:
    """One run with a worker SIGKILLed at each of KILL_AT_PARTS finished chunks."""
    import psutil

    started = time.perf_counter()
    summary = out.with_suffix(".json")
    proc = subprocess.Popen([*launch(src, restarts=3), *args, "--out", str(out), "--summary", str(summary)], cwd=src,
                            env=job_env(src), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    parts = out.parent / f".{out.name}.parts"
    for count in KILL_AT_PARTS:
        while len(list(parts.glob("*.part"))) < count and proc.poll() is None \
                and time.perf_counter() - started < HUNG_AFTER_S:
            time.sleep(0.05)
        if proc.poll() is None and time.perf_counter() - started < HUNG_AFTER_S:
            psutil.Process(proc.pid).children()[-1].kill()  # a worker, never the launcher
    try:
        _, stderr = proc.communicate(timeout=max(1.0, HUNG_AFTER_S - (time.perf_counter() - started)))
        hung = False
    except subprocess.TimeoutExpired:  # a group that never re-formed: no progress, no CPU
        for process in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
            process.kill()
        _, stderr = proc.communicate()
        hung = True
    done = json.loads(summary.read_text()) if proc.returncode == 0 else {}
    return {"exit_code": proc.returncode, "hung": hung, "seconds": round(time.perf_counter() - started, 1),
            "restarts": done.get("restarts"), "resumed_inputs": done.get("resumed_inputs"),
            "gloo_connect_failures": stderr.count("connectFullMesh failed")}


def variant(src: Path, model: str, array: Path, runs: int, work: Path, log=print) -> dict:
    args = [str(array), "--model", model, "--runtime", "onnxruntime", "--chunk-size", str(CHUNK)]
    straight = work / "straight.csv"
    subprocess.run([*launch(src), *args, "--out", str(straight)], cwd=src, env=job_env(src), check=True,
                   capture_output=True)
    want = hashlib.sha256(straight.read_bytes()).hexdigest()
    results = []
    for i in range(runs):
        out = work / f"killed-{i}.csv"
        result = killed_run(src, args, out)
        result["identical"] = out.exists() and hashlib.sha256(out.read_bytes()).hexdigest() == want
        results.append(result)
        log(f"  {src.name}: run {i + 1}/{runs}: {result}")
    return {"src": str(src), "runs": results, "clean": sum(r["exit_code"] == 0 and r["identical"] for r in results)}


def benchmark(model: str, runs: int, rows: int, srcs: dict, log=print) -> dict:
    """{name: src} of the checkouts to compare, each run ``runs`` times over the same array."""
    with tempfile.TemporaryDirectory() as tmp:
        array = write_array(Path(tmp), rows)
        report = {"machine": sysinfo.machine(), "versions": sysinfo.versions("torch", "accelerate", "onnxruntime"),
                  "settings": {"rows": rows, "chunk": CHUNK, "processes": 2, "max_restarts": 3,
                               "kills_at_parts": list(KILL_AT_PARTS), "runs": runs}, "variants": {}}
        for name, src in srcs.items():
            work = Path(tmp) / name
            work.mkdir()
            log(f"{name} ({src})")
            report["variants"][name] = variant(Path(src).resolve(), model, array, runs, work, log)
    return report
