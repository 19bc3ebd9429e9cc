# syntax=docker/dockerfile:1
# One image for the worker, the command line and the one-shot jobs of docker-compose.yml.
#
#   docker build -t moderation .            CPU-only torch from the PyTorch CPU index (default)
#   docker build -t moderation:cuda --build-arg TORCH_INDEX_URL=https://pypi.org/simple .
#                                           PyPI's torch, with its CUDA libraries (about 2.7 GB);
#                                           run it with the NVIDIA container toolkit (--gpus all)
#
# torch's version is pinned in constraints.txt only. Everything is installed from wheels
# (--only-binary): neither the build nor the image needs a compiler.

ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS build
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /venv
WORKDIR /app
# torch first and alone: its layer, the largest by far, is reused while the rest changes.
COPY constraints.txt ./
RUN /venv/bin/pip install --only-binary=:all: --constraint constraints.txt \
        --index-url "$TORCH_INDEX_URL" torch
# Then the other dependencies, read from pyproject.toml, before the code for the same reason;
# with the Milvus client (extra `milvus`), so one image serves either search backend.
COPY pyproject.toml ./
RUN /venv/bin/python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; print(*p['dependencies'], *p['optional-dependencies']['milvus'], sep='\n')" \
        > /tmp/requirements.txt \
    && /venv/bin/pip install --only-binary=:all: --constraint constraints.txt \
        --requirement /tmp/requirements.txt
COPY README.md ./
COPY moderation ./moderation
COPY migrations ./migrations
# Editable: `moderation db upgrade` reads migrations/ beside the package, as in a checkout.
# The runtime stage keeps the same paths, so the link holds there too.
RUN /venv/bin/pip install --no-deps --editable . \
    && /venv/bin/python -c "import moderation.main.cli, moderation.schema"

FROM python:${PYTHON_VERSION}-slim AS runtime
# Nothing to build here: the venv and the code are copied over whole.
RUN useradd --create-home --uid 1000 moderation \
    && mkdir -p /cache/huggingface && chown moderation /cache/huggingface
COPY --from=build /venv /venv
COPY --from=build /app /app
ENV PATH=/venv/bin:$PATH \
    HF_HOME=/cache/huggingface \
    PYTHONUNBUFFERED=1
WORKDIR /app
USER moderation
CMD ["moderation", "worker"]
