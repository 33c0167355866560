# debias: CPU or CUDA (the pinned torch 2.14.1 wheel carries its CUDA 13 runtime; run with --gpus all to use it).
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 DEBIAS_CACHE_DIR=/cache
WORKDIR /app
COPY pyproject.toml constraints.txt README.md ./
COPY debias ./debias
COPY pipelines ./pipelines
COPY service ./service
RUN pip install -c constraints.txt . \
    && useradd --create-home --uid 10001 debias \
    && mkdir -p /cache /model && chown debias /cache /model
USER debias
VOLUME ["/model", "/cache"]
ENTRYPOINT ["debias"]
CMD ["--help"]
