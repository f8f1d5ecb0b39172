# The gpu profile's image: NVIDIA's Triton TensorRT-LLM container (the tag pinned in
# medgemma_triton/gpu/pins.py and docs/gpu.md) with this package installed as docs/gpu.md installs it:
# torch, transformers, TensorRT-LLM and ModelOpt come with the container.
#   docker build -f deploy/gpu.Dockerfile -t medgemma-triton-gpu:0.1.0-trtllm-26.07 .
# NOT BUILT OR RUN HERE (no Docker daemon, no GPU): docs/kubernetes.md.
# What is inside it (TensorRT-LLM 1.2.1, the only release the llm model accepts) is recorded in pins.py.
FROM nvcr.io/nvidia/tritonserver:26.07-trtllm-python-py3

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

WORKDIR /src
COPY pyproject.toml README.md LICENSE NOTICE ./
COPY medgemma_triton ./medgemma_triton
COPY export ./export
COPY client ./client
COPY model_repository ./model_repository
COPY gpu_model_repository ./gpu_model_repository
# `build` validates configs with tritonclient's schema (docs/gpu.md).
RUN pip install --no-deps . \
    && pip install tokenizers==0.23.3 jinja2 pydicom 'tritonclient[grpc]==2.73.0' \
    && cd / && rm -rf /src \
    && useradd --uid 10001 --user-group --home-dir /tmp --no-create-home --shell /usr/sbin/nologin medgemma

ENV HOME=/tmp
WORKDIR /tmp
USER 10001:10001
EXPOSE 8000 8001 8002
# NVIDIA's entrypoint sets up the container's CUDA environment (driver compatibility), then runs the command.
ENTRYPOINT ["/opt/nvidia/nvidia_entrypoint.sh", "medgemma-triton"]
CMD ["--help"]
