# Common base of the stand-ins: the debootstrapped bookworm rootfs (python3, venv, pip, bash, wget, sudo,
# PostgreSQL), plus the build host's local CA certificates (ca/, copied by deploy/check from
# /usr/local/share/ca-certificates), so pip and apt work behind a TLS-inspecting proxy. PIP_CERT makes
# pip use the system bundle instead of its own certifi copy; images built FROM the stand-ins inherit it.
ARG ROOTFS_IMAGE=vqtrain-standin/rootfs:bookworm
FROM ${ROOTFS_IMAGE}
COPY ca/ /usr/local/share/ca-certificates/
RUN update-ca-certificates >/dev/null
ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
    REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt \
    LANG=C.UTF-8
CMD ["bash"]
