# The project image for Kubeflow tasks (and any container run of `mdsgen`): Python 3.11, torch, mdsgen
# with its pipeline and Kubeflow extras, aisfx. One file, two variants:
#   CPU:  docker build -t mdsgen:0.1.0-cpu .
#   CUDA: docker build -t mdsgen:0.1.0-cuda --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
# The CUDA wheels bundle the CUDA runtime; the node needs only the NVIDIA driver (container toolkit).
FROM python:3.11.11-slim-bookworm

ARG TORCH=torch==2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

# tuxpaint-stamps-default: the embedded dataset's pictures and recordings; git: dvc
RUN apt-get update \
 && apt-get install -y --no-install-recommends tuxpaint-stamps-default git \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /app
RUN pip install --no-cache-dir -U "pip==25.3" \
 && pip install --no-cache-dir "${TORCH}" --index-url "${TORCH_INDEX}"

COPY pyproject.toml README.md params.yaml dvc.yaml ./
COPY mdsgen mdsgen
COPY components components
COPY pipelines pipelines
COPY serving serving
RUN pip install --no-cache-dir ".[pipeline,kubeflow]" \
 && pip install --no-cache-dir --no-deps "aisfx==0.1.2"

ENV PYTHONPATH=/app DVC_NO_ANALYTICS=1 MDSGEN_CACHE=/tmp/mdsgen-cache
RUN useradd --create-home --uid 1000 mdsgen
USER mdsgen
CMD ["mdsgen", "--help"]
