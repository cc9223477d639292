# Stand-in for rayproject/ray:2.60.0-py311-cpu (BASE_IMAGE) with the same user layout: user `ray`
# (uid 1000, gid 100 `users`), home /home/ray, python/pip from a ray-owned env at /home/ray/anaconda3,
# passwordless sudo (the Dockerfile removes it), bash and wget. Ray itself is not here: the runtime
# stage installs ray[...] from pyproject.toml (pinned by constraints.txt).
ARG DEBIAN_IMAGE=vqtrain-standin/debian:bookworm
FROM ${DEBIAN_IMAGE}
RUN useradd --create-home --home-dir /home/ray --uid 1000 --gid 100 --shell /bin/bash ray \
    && echo 'ray ALL=NOPASSWD: ALL' >> /etc/sudoers \
    && su ray -c 'python3 -m venv /home/ray/anaconda3' \
    && command -v bash wget sudo
ENV PATH=/home/ray/anaconda3/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    HOME=/home/ray
USER 1000:100
WORKDIR /home/ray
CMD ["bash"]
