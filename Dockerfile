# The cpu profile's image: `medgemma-triton` with Triton 2.51 (nvidia-pytriton wheel), ONNX Runtime, the
# exporter (torch, for `build`), the client and the OpenAI gateway. Kubernetes: docs/kubernetes.md.
#   docker build -t medgemma-triton:0.1.0-cpu .
# The gpu profile's image: deploy/gpu.Dockerfile.

# llama.cpp for the int4/int8 decoder (export/llamacpp_build.py): llama-cpp-python from its pinned source,
# built with every CPU variant of ggml, so the one image picks each host's kernels when it starts.
FROM python:3.11-slim-bookworm AS llamacpp
RUN apt-get update && apt-get install -y --no-install-recommends build-essential cmake \
    && rm -rf /var/lib/apt/lists/*
ENV MEDGEMMA_LLAMA_CPP_CACHE=/build/llamacpp
WORKDIR /src
COPY pyproject.toml README.md LICENSE NOTICE ./
COPY medgemma_triton ./medgemma_triton
COPY export ./export
COPY client ./client
COPY model_repository ./model_repository
COPY gpu_model_repository ./gpu_model_repository
RUN pip install --no-deps . && pip install numpy==1.26.4 diskcache==5.6.3 typing-extensions jinja2 \
    && python -m medgemma_triton.export.llamacpp_build \
    && mkdir -p /wheels /opt/llama.cpp \
    && cp /build/llamacpp/wheels/*/*.whl /wheels/ \
    && cd /build/llamacpp/llama_cpp_python-*/vendor/llama.cpp \
    && cp -r convert_hf_to_gguf.py conversion gguf-py /opt/llama.cpp/

FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MEDGEMMA_LLAMA_CPP_SOURCE=/opt/llama.cpp

# ggml's CPU backends use OpenMP
RUN apt-get update && apt-get install -y --no-install-recommends libgomp1 && rm -rf /var/lib/apt/lists/*

# torch first, pinned, from PyTorch's CPU index: the export step (`build`) needs it, and an unpinned or
# PyPI torch pulls several GB of CUDA wheels (scripts/setup.sh). `.[export]` then finds it satisfied.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0

WORKDIR /src
COPY pyproject.toml README.md LICENSE NOTICE ./
COPY medgemma_triton ./medgemma_triton
COPY export ./export
COPY client ./client
COPY model_repository ./model_repository
COPY gpu_model_repository ./gpu_model_repository
COPY --from=llamacpp /wheels /wheels
COPY --from=llamacpp /opt/llama.cpp /opt/llama.cpp
RUN pip install ".[export,cpu,client,gateway]" \
    && pip install --no-deps /wheels/*.whl && rm -rf /wheels \
    && cd / && rm -rf /src \
    && useradd --uid 10001 --user-group --home-dir /tmp --no-create-home --shell /usr/sbin/nologin medgemma

# Writes go to /tmp only (serve: the backend copy and Triton's log; build: caches), so the root
# filesystem can be mounted read-only.
ENV HOME=/tmp
WORKDIR /tmp
USER 10001:10001
EXPOSE 8000 8001 8002 9000
ENTRYPOINT ["medgemma-triton"]
CMD ["--help"]
