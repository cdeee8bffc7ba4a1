# syntax=docker/dockerfile:1
# The lab's GPU container: JupyterLab on the learner's workspace (port 8888, token auth on) and
# room for `labkit serve` (port 8000). Needs the NVIDIA Container Toolkit on the host:
#   docker build -t gpu-inference-lab .
#   docker run --rm --gpus all -p 8888:8888 -p 8000:8000 gpu-inference-lab
# then open the http://127.0.0.1:8888/lab?token=… URL from the log (or pass -e JUPYTER_TOKEN=…).
#
# The CUDA base image brings what the container runtime needs to expose the host's driver and
# NVML; torch==2.13.0 from PyPI ships its own CUDA and cuDNN libraries, so a -runtime or -cudnn
# image would only hold a second copy of them.
FROM nvidia/cuda:12.8.1-base-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

# Pinned to the release series Ubuntu 24.04 ships, so security updates still apply.
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        make=4.3* \
        python3=3.12.* \
        python3-venv=3.12.* \
        tini=0.19* \
    && rm -rf /var/lib/apt/lists/*

# A non-root user with uid 1000 (the usual first user on a host, so bind mounts stay writable);
# Ubuntu's image already has `ubuntu` there, which is removed. /lab/downloads and /lab/workspace
# exist in the image so that named volumes mounted there (compose.yaml) start out owned by, and
# writable for, lab.
RUN userdel --remove ubuntu \
    && useradd --create-home --uid 1000 --shell /bin/bash lab \
    && install -d -o lab -g lab /lab /lab/downloads /lab/workspace
WORKDIR /lab
USER 1000

# The same install as `make venv` (pinned dependencies, labkit in editable mode).
# It runs before the rest of the repo is copied, against a placeholder package, so that editing
# the course does not reinstall torch; the editable install then picks up the real labkit/.
COPY --chown=1000:1000 pyproject.toml README.md Makefile ./
RUN mkdir labkit && touch labkit/__init__.py && make venv

COPY --chown=1000:1000 . .
# The embedded default model must be inside: the course runs offline on it.
RUN test -f model/config.json \
    || { echo "model/ is missing from the build context: build from the repository root"; exit 1; }

ENV PATH=/lab/.venv/bin:$PATH
EXPOSE 8888 8000

# /api answers without a token: it says whether the server is up, nothing more.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8888/api', timeout=4)"]

# tini reaps the kernels' child processes and forwards `docker stop` to JupyterLab.
ENTRYPOINT ["tini", "--"]
# As `make lab`: the learner's copies of notebooks/ and exercises/ in workspace/ (made once, then
# kept; labkit/course/workspace.py), so the image's committed notebooks stay as shipped.
CMD ["sh", "-c", "python -m labkit.course.workspace sync --into workspace && exec jupyter lab --ip 0.0.0.0 --port 8888 --no-browser --notebook-dir workspace"]
