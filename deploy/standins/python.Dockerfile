# Stand-in for python:3.11.x-slim-bookworm (PYTHON_IMAGE): Debian bookworm's Python 3.11 in a venv on
# PATH, so `python` and `python -m pip` work as in the official image (Debian's own python3 refuses pip).
ARG DEBIAN_IMAGE=vqtrain-standin/debian:bookworm
FROM ${DEBIAN_IMAGE}
RUN python3 -m venv /opt/python && /opt/python/bin/python -m pip --version
ENV PATH=/opt/python/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
CMD ["python3"]
