# The mnistlab image: workers, the one-shot study creation and the MLflow server of the stack.
# CPU build by default; the GPU variant (docker-compose.gpu.yml) passes a CUDA wheel index.
FROM python:3.11-slim

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
# Where torch's own dependencies come from: PyPI, or a local wheel index (docker/try-stack.sh).
ARG TORCH_EXTRA_INDEX=https://pypi.org/simple
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 MNISTLAB_DATA_DIR=/opt/mnistlab/data

WORKDIR /app
# torch first, from the chosen index, so the project install below keeps it.
RUN pip install --index-url "$TORCH_INDEX" --extra-index-url "$TORCH_EXTRA_INDEX" \
        "torch>=2.10,<=2.14.1" "torchvision>=0.25,<=0.29.1"
COPY pyproject.toml README.md ./
COPY mnistlab ./mnistlab
RUN pip install ".[dashboard]"
# MNIST ships with mnistlab (mnistlab/core/mnist/): build the cache once, no download.
RUN mnistlab data prepare && chmod -R a+rX /opt/mnistlab
COPY experiments ./experiments
COPY studies ./studies
COPY docker ./docker

RUN useradd --create-home --uid 1000 mnistlab && mkdir -p /var/lib/mnistlab /mlflow \
    && chown mnistlab /var/lib/mnistlab /mlflow
USER mnistlab
ENTRYPOINT ["mnistlab"]
CMD ["--help"]
