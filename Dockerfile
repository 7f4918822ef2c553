# The slim server: onnxruntime, FastAPI and uvicorn from the lock, no torch, run as a non-root user.
#
#   docker build -t mnist-dist-serve .
#   docker run -p 8080:8080 -v "$PWD/models:/mnt/models:ro" mnist-dist-serve
#   docker run -p 8080:8080 -e STORAGE_URI=s3://bucket/models -e AWS_REGION=... mnist-dist-serve
#
# The model repository is mounted at /mnt/models (where KServe's storage initializer puts STORAGE_URI) or named by
# STORAGE_URI itself (s3://, a path). New versions written into it go live without a restart (poll mode).
# tests/test_deploy.py runs this file's install and entrypoint steps, with its environment, in a fresh venv.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY constraints ./constraints
COPY mnist_dist ./mnist_dist
RUN pip install -c constraints/serve.txt ".[serve,s3]"

RUN useradd --create-home --uid 10001 serve
USER 10001
WORKDIR /home/serve

ENV STORAGE_URI=/mnt/models XDG_CACHE_HOME=/home/serve/.cache
EXPOSE 8080
ENTRYPOINT ["mnist-dist", "serve", "--host", "0.0.0.0", "--port", "8080"]
CMD ["--model-control-mode", "poll", "--repository-poll-s", "30"]
