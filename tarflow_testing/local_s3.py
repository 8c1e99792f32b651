"""A real S3 endpoint on loopback (moto's server mode), with the standard AWS variables pointing at it while it
runs, so that separate processes (ranks, loader workers, benchmarks' runs) see the same buckets."""

from __future__ import annotations

import contextlib
import os

_S3_ENV = ("AWS_ENDPOINT_URL", "S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")


@contextlib.contextmanager
def local_s3(*buckets: str):
    """Start the server, create ``buckets``, yield its URL; stop it and restore the environment afterwards."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in _S3_ENV}
    os.environ.update({"AWS_ENDPOINT_URL": url, "S3_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"})
    try:
        for bucket in buckets:
            boto3.client("s3").create_bucket(Bucket=bucket)
        yield url
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
