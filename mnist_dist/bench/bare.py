"""The anchor of the serving benchmark: a bare FastAPI endpoint that only reads the body and returns a constant.

It runs under the same uvicorn settings as ``mnist-dist serve``, so its
requests/s is the framework's own ceiling on this machine, with this load
generator; the server's figures are read as shares of it.

    python -m mnist_dist.bench.bare --port 0 [--workers N]    # prints the URL it listens on
"""
import click
from fastapi import FastAPI, Request
from fastapi.responses import Response

from ..serving.server import bind, uvicorn_config

ANSWER = b'{"ok":true}'


def create_app() -> FastAPI:
    app = FastAPI()

    @app.post("/echo")
    async def echo(request: Request):
        await request.body()
        return Response(ANSWER, media_type="application/json")

    return app


@click.command()
@click.option("--port", default=0, show_default=True, type=click.IntRange(0, 65535))
@click.option("--workers", default=1, show_default=True, type=click.IntRange(min=1),
              help="Processes on the one port, as the server's --workers.")
def main(port, workers):
    import uvicorn
    from uvicorn.supervisors import Multiprocess

    sock = bind("127.0.0.1", port)
    click.echo(f"Serving the bare endpoint on http://127.0.0.1:{sock.getsockname()[1]}/", )
    if workers == 1:
        uvicorn.Server(uvicorn_config(create_app())).run(sockets=[sock])
    else:
        Multiprocess(uvicorn_config(f"{__name__}:create_app", factory=True, workers=workers), sockets=[sock]).run()


if __name__ == "__main__":
    main()
