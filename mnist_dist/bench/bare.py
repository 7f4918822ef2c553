"""The anchor of the serving benchmark: a bare FastAPI endpoint that only reads the body and returns a constant.

It runs under the same uvicorn settings as ``mnist-dist serve``, so its
requests/s is the framework's own ceiling on this machine, with this load
generator; the server's figures are read as shares of it.

    python -m mnist_dist.bench.bare --port 0     # prints the URL it listens on
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
def main(port):
    import uvicorn

    sock = bind("127.0.0.1", port)
    click.echo(f"Serving the bare endpoint on http://127.0.0.1:{sock.getsockname()[1]}/", )
    uvicorn.Server(uvicorn_config(create_app())).run(sockets=[sock])


if __name__ == "__main__":
    main()
