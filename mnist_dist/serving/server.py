"""Start the HTTP server: check everything first, then hand a bound socket to uvicorn."""
import socket

from ..errors import UserError
from .app import ServeOptions, create_app, load


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


def serve(options: ServeOptions, host: str = "127.0.0.1", port: int = 8000, log=print) -> None:
    import uvicorn

    served = load(options)
    sock = bind(host, port)
    app = create_app(served)
    batching = (f"micro-batching up to {options.max_batch} images or {options.max_wait_ms:g} ms"
                if options.batching else "no batching")
    shown = f"[{host}]" if ":" in host else host
    log(f"Serving {served.model.path} ({served.model.description}, {batching}) on http://{shown}:{sock.getsockname()[1]}/")
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])
