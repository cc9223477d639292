# vqtrain images. One image (`runtime`, the default target) runs the API service (`vqtrain serve`)
# and a Ray head or worker node (`ray start ...`): every node of a cluster then has the same Ray,
# torch, Python and project code, which Ray requires (it refuses a node whose Ray or Python version
# differs from the head's).
#
#   CPU (default):   docker build -t vqtrain:0.1.0 .
#   CUDA:            docker build -t vqtrain:0.1.0-cuda \
#                      --build-arg BASE_IMAGE=rayproject/ray:2.60.0-py311-gpu \
#                      --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
#   MLflow server:   docker build --target mlflow -t vqtrain-mlflow:0.1.0 .
#
# Builds with the legacy builder (DOCKER_BUILDKIT=0) or BuildKit; no `# syntax=` line, so BuildKit
# fetches no frontend image. Every pip install of third-party packages is constrained by
# constraints.txt (the versions the test suite passed with); tests/deploy checks that.
#
# Stages: `wheel` builds the project wheel; `mlflow` is the tracking server (PostgreSQL + S3 drivers);
# `runtime` installs torch first (so no dependency can pull a different torch build), then the
# dependencies pinned in pyproject.toml (their own layer, cached while only code changes), then the wheel.
#
# The Ray base image pins the Ray release (keep it equal to `ray[...]==X.Y.*` in pyproject.toml;
# tests/deploy checks it) and brings a non-root `ray` user (uid 1000, gid 100), bash and wget, which
# KubeRay's probes and the Ray cluster launcher expect. Its -cpu and -gpu variants of one release carry
# the same Python patch version, so CPU and CUDA nodes can join one cluster.

ARG BASE_IMAGE=rayproject/ray:2.60.0-py311-cpu
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

# ---------------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY vqbase ./vqbase
COPY vqmodels ./vqmodels
COPY jobs ./jobs
COPY service ./service
RUN python -m pip wheel --no-cache-dir --no-deps --wheel-dir /dist .

# ---------------------------------------------------------------------------------------------------
# MLflow tracking server. Artifacts are proxied by the server (--serve-artifacts) to S3, so only this
# image needs boto3 and the S3 credentials. The PostgreSQL driver is psycopg 3: SQLAlchemy 2.1 maps
# `postgresql://` to it (tests/deploy asks the pinned SQLAlchemy which module it imports).
FROM ${PYTHON_IMAGE} AS mlflow
ARG MLFLOW_VERSION=3.17.2
COPY constraints.txt /tmp/constraints.txt
RUN python -m pip install --no-cache-dir -c /tmp/constraints.txt \
        "mlflow==${MLFLOW_VERSION}" "psycopg[binary]" boto3 \
    && rm /tmp/constraints.txt \
    && useradd --create-home --uid 1000 --gid 100 mlflow
USER 1000:100
WORKDIR /home/mlflow
EXPOSE 5000
CMD ["mlflow", "server", "--host", "0.0.0.0", "--port", "5000"]

# ---------------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS runtime
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG EXTRAS=train,service,postgres

# The base lets `ray` sudo without a password; a service image does not need that.
USER root
RUN sed -i '/^ray ALL=NOPASSWD/d' /etc/sudoers && rm -f /etc/sudoers.d/ray \
    && mkdir -p /home/ray/vqtrain/state && chown -R 1000:100 /home/ray/vqtrain
USER 1000:100
WORKDIR /home/ray/vqtrain

COPY --chown=1000:100 constraints.txt ./
RUN python -m pip install --no-cache-dir -c constraints.txt "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

# Dependencies from pyproject.toml (not the code), so this layer survives code changes.
COPY --chown=1000:100 pyproject.toml ./
RUN python -c "import sys, tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
print('\n'.join(p['dependencies'] + [d for e in sys.argv[1].split(',') for d in p['optional-dependencies'][e]]))" \
        "${EXTRAS}" > /tmp/requirements.txt \
    && python -m pip install --no-cache-dir -c constraints.txt -r /tmp/requirements.txt \
    && python -c "import torch, sys; v = torch.__version__.split('+')[0]; \
sys.exit(0 if v == '${TORCH_VERSION}' else 'torch was replaced by ' + torch.__version__)" \
    && rm /tmp/requirements.txt

# --chown: the RUN below, as uid 1000, deletes what this COPY brings in.
COPY --from=wheel --chown=1000:100 /dist/ /tmp/dist/
RUN python -m pip install --no-cache-dir --no-deps /tmp/dist/*.whl && rm -rf /tmp/dist
COPY --chown=1000:100 examples ./examples

ENV PYTHONUNBUFFERED=1 \
    VQTRAIN_HOME=/home/ray/vqtrain/state
# 8000: API; 6379: Ray GCS; 8265: Ray dashboard and Jobs API; 10001: Ray client.
EXPOSE 8000 6379 8265 10001
ENTRYPOINT []
CMD ["vqtrain", "serve", "--host", "0.0.0.0", "--port", "8000"]
