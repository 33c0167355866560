# debias novelty service: `debias serve` on the model mounted at /model, on CPU or on a GPU.
#
# Why a slim Python base and not nvidia/cuda: on Linux the pinned torch 2.14.1 wheel (+cu130) depends on the CUDA 13.0
# runtime as pip wheels (cuda-toolkit[cublas,cudart,cufft,...]==13.0.3, nvidia-cudnn-cu13, nvidia-nccl-cu13; all
# pinned in constraints.txt), so the image already carries every CUDA library torch loads. Only the driver comes from
# the host: `docker run --gpus all` (NVIDIA Container Toolkit) mounts it, and it must support CUDA 13.0 (driver >= 580).
# Without --gpus the same image runs on CPU (--device auto picks what is there).
#
#   docker build -t debias .
#   docker run --rm -p 8000:8000 -v "$PWD/runs/x:/model:ro" -e DEBIAS_API_KEY=change-me [--gpus all] debias
#
# Python 3.11: the version the project's pinned environment (constraints.txt) was resolved and tested with.
FROM python:3.11-slim-bookworm

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    VIRTUAL_ENV=/opt/debias \
    PATH=/opt/debias/bin:$PATH \
    DEBIAS_CACHE_DIR=/cache \
    MPLCONFIGDIR=/tmp/matplotlib

# The dependencies in their own layer, before the sources: editing the code does not re-download ~3 GB of torch + CUDA.
# The package list is read from pyproject.toml; every version comes from constraints.txt.
COPY pyproject.toml constraints.txt /build/
RUN python -m venv "$VIRTUAL_ENV" \
    && pip install -c /build/constraints.txt \
        $(python -c "import tomllib; print(' '.join(tomllib.load(open('/build/pyproject.toml', 'rb'))['project']['dependencies']))")

COPY README.md LICENSE /build/
COPY debias /build/debias
COPY pipelines /build/pipelines
COPY service /build/service
RUN pip install -c /build/constraints.txt --no-deps /build \
    && pip check \
    && rm -rf /build \
    && python -c "import pathlib, debias.service.app as app; assert (pathlib.Path(app.__file__).parent / 'static' / 'index.html').is_file()"

# An unprivileged user; the model is read from /model (mount it read-only), decoded images go to /cache.
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin debias \
    && mkdir -p /model /cache \
    && chown debias:debias /cache
USER debias
WORKDIR /home/debias
VOLUME ["/model", "/cache"]

EXPOSE 8000
# /healthz answers as soon as the server is up (the model loads and warms in the background; /readyz says when it is
# ready). python, not curl: the slim image has no curl.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]

# Extra `debias serve` options go after the image name: docker run ... debias --device cuda --max-batch-size 128
ENTRYPOINT ["debias", "serve", "--model", "/model", "--host", "0.0.0.0", "--port", "8000"]
CMD []
