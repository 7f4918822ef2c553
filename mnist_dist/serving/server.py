"""Start the HTTP server: check everything first, then hand a bound socket to uvicorn (one process, or N workers).

With ``workers`` > 1, uvicorn's own supervisor runs N server processes on the
one listening socket (the kernel spreads the connections), restarts one that
dies, and passes SIGTERM on to each, which then drains as one server does.
Each worker has its own model session and batcher, with the cores split
between them, and writes its metrics where every worker's ``/metrics`` adds
them up.
"""
from __future__ import annotations

import json
import os
import socket
import tempfile
from dataclasses import asdict, replace

from ..errors import UserError
from .app import load
from .model import run_threads
from .options import ServeOptions

WORKER_OPTIONS = "MNIST_DIST_SERVE_OPTIONS"  # how the supervisor hands the options to the workers it spawns


def bind(host: str, port: int) -> socket.socket:
    """Listen on host:port now, so that a busy port or a bad address is one UserError before anything starts."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:  # socket.gaierror is an OSError too
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror or e})") from e
    return sock


def serve(options: ServeOptions, host: str = "127.0.0.1", port: int = 8000, workers: int = 1, log=print) -> None:
    if workers > 1 and options.control_mode == "explicit":
        raise UserError("--model-control-mode explicit needs --workers 1: a load or unload would reach one worker "
                        "of several (poll mode reaches them all)")
    if workers > 1:  # the cores are split between the workers' sessions
        options = replace(options, threads=max(1, options.threads // workers) if options.threads else
                          run_threads(workers, options.model_threads))
    repository = load(options, log)  # every start-up error, once, here, before any worker starts
    sock = bind(host, port)
    batching = (f"micro-batching up to {options.max_batch} images or {options.max_wait_ms:g} ms"
                if options.batching else "no batching")
    shown = f"[{host}]" if ":" in host else host
    processes = f", {workers} workers" if workers > 1 else ""
    log(f"Serving {served_what(repository)} ({batching}{processes}, model control {options.control_mode}) on "
        f"http://{shown}:{sock.getsockname()[1]}/")
    if workers == 1:
        run_one(repository, sock)
    else:
        del repository  # each worker opens its own sessions
        run_workers(options, sock, workers)


def served_what(repository) -> str:
    models = [m for versions in repository.loaded.values() for m in versions.values()]
    if len(models) == 1:
        return f"{models[0].path} as {models[0].name} version {models[0].version} ({models[0].runner.description})"
    listed = ", ".join(f"{m.name} version {m.version}" for m in models)
    return f"{listed} from {repository.options.repository} ({models[0].runner.description})"


def uvicorn_config(app, **settings):
    import uvicorn

    # The drain is the app's (serving.lifecycle); uvicorn's own wait is set when the drain begins.
    return uvicorn.Config(app, log_level="warning", access_log=False, **settings)


def run_one(repository, sock: socket.socket) -> None:
    import uvicorn

    from .app import create_app

    uvicorn.Server(uvicorn_config(create_app(repository, process_wide=True))).run(sockets=[sock])


def run_workers(options: ServeOptions, sock: socket.socket, workers: int) -> None:
    from uvicorn.supervisors import Multiprocess

    with tempfile.TemporaryDirectory(prefix="mnist-dist-metrics-") as metrics_dir:
        os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", metrics_dir)
        os.environ[WORKER_OPTIONS] = json.dumps(asdict(options))
        config = uvicorn_config(f"{__name__}:worker_app", factory=True, workers=workers)
        Multiprocess(config, sockets=[sock]).run()


def worker_app():
    """The app of one worker process, from the options its supervisor checked."""
    from .app import create_app

    options = json.loads(os.environ[WORKER_OPTIONS])
    restricted_key = options["restricted_key"] and tuple(options["restricted_key"])  # JSON made the tuple a list
    return create_app(load(ServeOptions(**{**options, "restricted_key": restricted_key})), process_wide=True)
