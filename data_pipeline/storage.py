"""Reading and writing dataset files on a local path or ``s3://bucket/prefix`` (boto3).

Endpoint and credentials come only from the standard AWS chain (AWS_ENDPOINT_URL, AWS_PROFILE, AWS_ACCESS_KEY_ID,
~/.aws/config, instance roles …): nothing S3-specific is read from our configs, so none of it ends up in logs. The
client and its retry policy are ``s3.s3_client()``'s, the same the checkpoint stores use.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import BinaryIO

from .s3 import s3_client


class DataSourceError(RuntimeError):
    """A dataset location that cannot be read: missing file or object, unreachable or misconfigured endpoint."""


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[len("s3://"):].partition("/")
    if not bucket:
        raise DataSourceError(f"{uri!r} has no bucket; expected s3://bucket/prefix")
    return bucket, key


def join(uri: str, *parts: str) -> str:
    if is_s3(uri):
        return "/".join([uri.rstrip("/"), *[p.strip("/") for p in parts]])
    return str(Path(uri, *parts))


def _describe(e: Exception, uri: str) -> DataSourceError:
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3") or "AWS default"
    if isinstance(e, EndpointConnectionError):
        return DataSourceError(f"cannot reach the S3 endpoint for {uri} (endpoint: {endpoint}); check "
                               f"AWS_ENDPOINT_URL and the network")
    if isinstance(e, NoCredentialsError):
        return DataSourceError(f"no AWS credentials found for {uri}; set AWS_PROFILE or AWS_ACCESS_KEY_ID/"
                               f"AWS_SECRET_ACCESS_KEY")
    if isinstance(e, ClientError):
        code = e.response.get("Error", {}).get("Code", "")
        if code in ("NoSuchKey", "404", "NotFound"):
            return DataSourceError(f"{uri} does not exist")
        if code == "NoSuchBucket":
            return DataSourceError(f"bucket of {uri} does not exist (endpoint: {endpoint})")
        return DataSourceError(f"S3 refused {uri}: {code} {e} (endpoint: {endpoint})")
    return DataSourceError(f"cannot read {uri}: {type(e).__name__}: {e}")


def open_stream(uri: str) -> BinaryIO:
    """A readable binary stream of the whole file or object."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            return s3_client().get_object(Bucket=bucket, Key=key)["Body"]
        except Exception as e:
            raise _describe(e, uri) from None
    try:
        return open(uri, "rb")
    except FileNotFoundError:
        raise DataSourceError(f"{uri} does not exist") from None


def read_bytes(uri: str) -> bytes:
    stream = open_stream(uri)
    try:
        return stream.read()
    except Exception as e:
        raise _describe(e, uri) from None
    finally:
        stream.close()


def read_text(uri: str) -> str:
    return read_bytes(uri).decode()


def upload_file(local: str | Path, uri: str) -> None:
    """Local file → local path or S3 (boto3's transfer manager: multipart and retries for large shards)."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            s3_client().upload_file(str(local), bucket, key)
        except Exception as e:
            raise _describe(e, uri) from None
        return
    Path(uri).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(f"{uri}.tmp-{os.getpid()}")
    shutil.copyfile(local, tmp)
    os.replace(tmp, uri)


def exists(uri: str) -> bool:
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            s3_client().head_object(Bucket=bucket, Key=key)
            return True
        except Exception as e:
            err = _describe(e, uri)
            if "does not exist" in str(err) and "bucket" not in str(err):
                return False
            raise err from None
    return Path(uri).exists()


def list_sizes(uri: str) -> dict[str, int]:
    """File name → size of everything directly under a directory or ``s3://`` prefix (not below it)."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        prefix = key.rstrip("/") + "/" if key else ""
        sizes: dict[str, int] = {}
        try:
            for page in s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
                for obj in page.get("Contents", []):
                    name = obj["Key"][len(prefix):]
                    if "/" not in name:
                        sizes[name] = int(obj["Size"])
        except Exception as e:
            raise _describe(e, uri) from None
        return sizes
    path = Path(uri)
    if not path.is_dir():
        raise DataSourceError(f"{uri} does not exist")
    return {p.name: p.stat().st_size for p in path.iterdir() if p.is_file()}
