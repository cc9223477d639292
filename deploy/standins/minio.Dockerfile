# Stand-in for minio/minio: moto's S3 server on :9000 behind a `minio` entrypoint that accepts MinIO's
# arguments, and an `mc` with just `mc ready local`, so compose.yaml's command and healthcheck run as is.
# moto keeps objects in memory (enough for one deploy/check run) and accepts any credentials.
ARG PYTHON_IMAGE=vqtrain-standin/python:3.11
FROM ${PYTHON_IMAGE}
COPY constraints.txt /tmp/constraints.txt
RUN python -m pip install --no-cache-dir -c /tmp/constraints.txt "moto[server]" && rm /tmp/constraints.txt
COPY minio-entrypoint /usr/local/bin/minio
COPY mc /usr/local/bin/mc
EXPOSE 9000
ENTRYPOINT ["/usr/local/bin/minio"]
CMD ["server", "/data"]
