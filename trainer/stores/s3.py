"""A store on ``s3://bucket/prefix`` through boto3.

Endpoint and credentials come only from the standard AWS chain (AWS_ENDPOINT_URL, AWS_PROFILE, AWS_ACCESS_KEY_ID,
~/.aws/config, instance roles …), never from our configs; messages name the endpoint URL and nothing else of it.

Integrity: every object carries our sha256 of the whole content in its metadata (``x-amz-meta-sha256``), and
downloads are verified against it (and against the caller's expectation). We also ask S3 for its own SHA256 checksum
(``ChecksumAlgorithm="SHA256"``), which it verifies on upload, per part for multipart uploads; but for a multipart
object that checksum is a checksum of part checksums, not of the content, so it cannot replace ours. (moto stores and
returns the checksum botocore computes, but does not reject a wrong one, so the tests rely on our metadata.)

Retries: botocore's "standard" mode retries single requests (the project's one client factory and retry policy,
``data_pipeline.s3``, with ``client_attempts`` tries per request); around each whole operation (one upload, one
download, one listing, one delete batch) we retry transient failures again, with exponential backoff and full
jitter. This outer loop also covers what botocore cannot: a corrupted download, a multipart upload that failed as
a whole.
"""

from __future__ import annotations

import hashlib
import os
import random
import socket
import time
from pathlib import Path
from typing import Callable, Iterable, TypeVar
from urllib.parse import urlsplit

from boto3.exceptions import RetriesExceededError, S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.exceptions import (
    ChecksumError,
    ClientError,
    FlexibleChecksumError,
    HTTPClientError,
    IncompleteReadError,
    NoCredentialsError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError
from s3transfer.exceptions import RetriesExceededError as TransferRetriesExceededError

from data_pipeline.s3 import s3_client
from trainer.stores import ObjectInfo, ObjectNotFound, Store, StoreError, check_key, check_prefix, mismatch, sha256_file
from trainer.stores.local import tmp_path_for

T = TypeVar("T")
MiB = 1 << 20

_TRANSIENT_CODES = {"InternalError", "ServiceUnavailable", "SlowDown", "Throttling", "ThrottlingException",
                    "RequestTimeout", "RequestTimeTooSkewed", "RequestLimitExceeded", "TooManyRequestsException",
                    "BadDigest", "IncompleteBody", "XAmzContentSHA256Mismatch", "ConditionalRequestConflict"}
_TRANSIENT_STATUS = {429, 500, 502, 503, 504}
_TRANSIENT_ERRORS = (BotoConnectionError, HTTPClientError, IncompleteReadError, FlexibleChecksumError, ChecksumError,
                     ConnectionError, socket.timeout, TimeoutError)
_NOT_FOUND = {"NoSuchKey", "404", "NotFound"}


class _Corrupt(Exception):
    """Downloaded bytes that do not match what S3 says it holds: damaged in transit, so worth another try."""


def _unwrap(e: BaseException) -> BaseException:
    # boto3's upload_file turns a ClientError into S3UploadFailedError (the original is its __context__), and
    # download_file reports exhausted stream retries as RetriesExceededError: look at what actually happened.
    if isinstance(e, S3UploadFailedError) and e.__context__ is not None:
        return e.__context__
    if isinstance(e, (RetriesExceededError, TransferRetriesExceededError)) and e.last_exception is not None:
        return e.last_exception
    return e


def _code(e: BaseException) -> tuple[str, int]:
    if isinstance(e, ClientError):
        return (str(e.response.get("Error", {}).get("Code", "")),
                int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0))
    return "", 0


def is_transient(e: BaseException) -> bool:
    e = _unwrap(e)
    if isinstance(e, _Corrupt):
        return True
    if isinstance(e, ClientError):
        code, status = _code(e)
        return code in _TRANSIENT_CODES or status in _TRANSIENT_STATUS
    return isinstance(e, _TRANSIENT_ERRORS)


class S3Store(Store):
    def __init__(self, bucket: str, prefix: str = "", *,
                 attempts: int = 5, base_delay: float = 0.5, max_delay: float = 30.0,
                 client_attempts: int = 3, connect_timeout: float = 10.0, read_timeout: float = 60.0,
                 multipart_threshold: int = 64 * MiB, multipart_chunksize: int = 16 * MiB, max_concurrency: int = 4,
                 list_page_size: int = 1000, delete_batch_size: int = 1000):
        """``attempts``: tries of each whole operation (our loop), sleeping uniform(0, min(max_delay,
        base_delay * 2**n)) seconds between them; ``client_attempts``: botocore's own tries of each request.
        Multipart sizes: S3 wants parts of at least 5 MiB (except the last)."""
        if not bucket:
            raise StoreError("S3Store needs a bucket (s3://bucket/prefix)")
        prefix = prefix.strip("/")
        self.bucket = bucket
        self.prefix = check_key(prefix) + "/" if prefix else ""
        self.attempts = max(1, attempts)
        self.base_delay, self.max_delay = base_delay, max_delay
        self._client_args = (client_attempts, connect_timeout, read_timeout)
        self.transfer = TransferConfig(multipart_threshold=multipart_threshold, multipart_chunksize=multipart_chunksize,
                                       max_concurrency=max_concurrency,
                                       # The classic manager: it uses our botocore client (and its retries).
                                       preferred_transfer_client="classic")
        self.list_page_size = list_page_size
        self.delete_batch_size = delete_batch_size

    @classmethod
    def from_uri(cls, uri: str, **options) -> S3Store:
        bucket, _, prefix = uri[len("s3://"):].partition("/")
        return cls(bucket, prefix, **options)

    def __repr__(self) -> str:
        return f"S3Store({self.uri_for('')!r})"

    def _s3(self):
        # The project's one client factory and retry policy (data_pipeline.s3), with this store's tries per request.
        attempts, connect_timeout, read_timeout = self._client_args
        return s3_client(attempts=attempts, connect_timeout=connect_timeout, read_timeout=read_timeout)

    def _endpoint(self) -> str:
        url = urlsplit(self._s3().meta.endpoint_url)
        return f"{url.scheme}://{url.hostname}" + (f":{url.port}" if url.port else "")  # never any user:password@

    def _full(self, key: str) -> str:
        return self.prefix + check_key(key)

    def uri_for(self, key: str) -> str:
        return f"s3://{self.bucket}/{self.prefix}{key}"

    # -- errors and retries ------------------------------------------------------------------------------------------

    def _error(self, op: str, key: str, e: BaseException) -> StoreError:
        """A clear StoreError for a failure that retrying will not fix."""
        e = _unwrap(e)
        where = f"{self.uri_for(key)} (endpoint {self._endpoint()})"
        code, status = _code(e)
        if code in _NOT_FOUND:
            return ObjectNotFound(f"{where} does not exist")
        if code == "NoSuchBucket":
            return StoreError(f"bucket {self.bucket!r} does not exist: {op} {where}; check AWS_ENDPOINT_URL and the "
                              f"bucket name")
        if isinstance(e, NoCredentialsError):
            return StoreError(f"no AWS credentials found for {op} {where}; set AWS_PROFILE or AWS_ACCESS_KEY_ID/"
                              f"AWS_SECRET_ACCESS_KEY")
        if status == 403 or code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return StoreError(f"S3 refused {op} {where}: {code or status} (access denied); check AWS_ENDPOINT_URL / "
                              f"credentials and the bucket policy")
        if isinstance(e, OSError):  # connection errors were transient; this is our side (disk full, permissions)
            return StoreError(f"{op} {where} failed on the local side: {e}")
        return StoreError(f"{op} {where} failed: {type(e).__name__}: {e}; check AWS_ENDPOINT_URL / credentials")

    def _retry(self, op: str, key: str, fn: Callable[[int], T]) -> T:
        """Run ``fn(attempt)`` until it succeeds, a non-transient error occurs, or the attempts are spent."""
        last: BaseException | None = None
        for attempt in range(1, self.attempts + 1):
            try:
                return fn(attempt)
            except StoreError:
                raise
            except Exception as e:
                if not is_transient(e):
                    raise self._error(op, key, e) from e
                last = _unwrap(e)
            if attempt < self.attempts:
                # Full jitter: ranks that failed together do not come back together.
                time.sleep(random.uniform(0, min(self.max_delay, self.base_delay * 2 ** (attempt - 1))))
        raise StoreError(f"{op} {self.uri_for(key)} failed after {self.attempts} attempts (endpoint "
                         f"{self._endpoint()}); last error: {type(last).__name__}: {last}; check AWS_ENDPOINT_URL / "
                         f"credentials") from last

    def _missing(self, key: str) -> StoreError:
        # A HEAD has no error body, so a missing bucket also reads as 404: tell the two apart for the message.
        try:
            self._s3().head_bucket(Bucket=self.bucket)
        except ClientError as e:
            if _code(e)[0] in _NOT_FOUND | {"NoSuchBucket"}:
                return StoreError(f"bucket {self.bucket!r} does not exist (endpoint {self._endpoint()}); check "
                                  f"AWS_ENDPOINT_URL and the bucket name")
        except Exception:
            pass
        return ObjectNotFound(f"{self.uri_for(key)} does not exist (endpoint {self._endpoint()})")

    # -- writes ------------------------------------------------------------------------------------------------------

    def put_file(self, key: str, local_path: str | Path) -> ObjectInfo:
        full = self._full(key)
        try:
            digest, size = sha256_file(local_path)
        except OSError as e:
            raise StoreError(f"cannot read {local_path} for {self.uri_for(key)}: {e}") from e
        extra = {"ChecksumAlgorithm": "SHA256", "Metadata": {"sha256": digest}}
        # The transfer manager: one PutObject below multipart_threshold, else parallel UploadParts (each retried by
        # botocore; a failed multipart upload is aborted by s3transfer and then retried whole by our loop).
        self._retry("upload", key, lambda _: self._s3().upload_file(str(local_path), self.bucket, full,
                                                                    ExtraArgs=extra, Config=self.transfer))
        return ObjectInfo(key, size, digest)

    def put_bytes(self, key: str, data: bytes) -> ObjectInfo:
        full = self._full(key)
        digest = hashlib.sha256(data).hexdigest()
        self._retry("put", key, lambda _: self._s3().put_object(
            Bucket=self.bucket, Key=full, Body=data, ChecksumAlgorithm="SHA256", Metadata={"sha256": digest}))
        return ObjectInfo(key, len(data), digest)

    # -- reads -------------------------------------------------------------------------------------------------------

    def _verify(self, key: str, digest: str, size: int, stored_sha: str | None, stored_size: int | None,
                expected_sha256: str | None, expected_size: int | None) -> None:
        uri = self.uri_for(key)
        # Against what S3 says it holds: a difference means damage in transit (transient, so retried) ...
        if stored_size is not None and size != stored_size:
            raise _Corrupt(mismatch(uri, "size", stored_size, size))
        if stored_sha is not None and digest != stored_sha:
            raise _Corrupt(mismatch(uri, "sha256", stored_sha, digest))
        # ... against what the caller expects: if S3 vouched for the bytes, the object itself differs (final).
        if expected_size is not None and size != expected_size:
            raise StoreError(mismatch(uri, "size", expected_size, size))
        if expected_sha256 is not None and digest != expected_sha256:
            if stored_sha is None:  # nothing to tell damage from a different object: retry, then report
                raise _Corrupt(mismatch(uri, "sha256", expected_sha256, digest))
            raise StoreError(mismatch(uri, "sha256", expected_sha256, digest))

    def _existing(self, key: str, request):
        """``request()``, with S3's not-found answers turned into the store's ObjectNotFound naming the key."""
        try:
            return request()
        except ClientError as e:
            if _code(e)[0] in _NOT_FOUND:
                raise self._missing(key) from None
            raise

    def get_file(self, key: str, local_path: str | Path, expected_sha256: str | None = None,
                 expected_size: int | None = None) -> None:
        full = self._full(key)
        dest = Path(local_path)
        dest.parent.mkdir(parents=True, exist_ok=True)

        def attempt(_: int) -> None:
            head = self._existing(key, lambda: self._s3().head_object(Bucket=self.bucket, Key=full))
            tmp = tmp_path_for(dest)
            try:
                self._s3().download_file(self.bucket, full, str(tmp), Config=self.transfer)
                digest, size = sha256_file(tmp)
                self._verify(key, digest, size, head.get("Metadata", {}).get("sha256"), head.get("ContentLength"),
                             expected_sha256, expected_size)
                os.replace(tmp, dest)
            finally:
                tmp.unlink(missing_ok=True)

        self._retry("download", key, attempt)

    def get_bytes(self, key: str, expected_sha256: str | None = None) -> bytes:
        full = self._full(key)

        def attempt(_: int) -> bytes:
            response = self._existing(key, lambda: self._s3().get_object(Bucket=self.bucket, Key=full))
            # botocore checks S3's checksum of a single-part object while reading (FlexibleChecksumError: retried).
            data = response["Body"].read()
            self._verify(key, hashlib.sha256(data).hexdigest(), len(data), response.get("Metadata", {}).get("sha256"),
                         response.get("ContentLength"), expected_sha256, None)
            return data

        return self._retry("download", key, attempt)

    def exists(self, key: str) -> bool:
        full = self._full(key)
        # A listing rather than a HEAD: a HEAD answers a bare 404 for a missing bucket too, which would read as
        # "no checkpoint here". Among keys starting with ``full``, ``full`` itself sorts first.
        response = self._retry("exists", key, lambda _: self._s3().list_objects_v2(
            Bucket=self.bucket, Prefix=full, MaxKeys=1))
        return any(o["Key"] == full for o in response.get("Contents", []))

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        full = self.prefix + check_prefix(prefix)

        def attempt(_: int) -> list[ObjectInfo]:
            # A failure mid-way restarts the listing: a listing is cheap next to a checkpoint.
            found = []
            pages = self._s3().get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=full, PaginationConfig={"PageSize": self.list_page_size})
            for page in pages:
                for obj in page.get("Contents", []):
                    key = obj["Key"][len(self.prefix):]
                    if key:  # skip a "directory marker" equal to the store prefix itself
                        found.append(ObjectInfo(key, int(obj["Size"])))
            return found

        return sorted(self._retry("list", prefix, attempt), key=lambda o: o.key)

    def delete(self, keys: Iterable[str]) -> None:
        full = [self._full(k) for k in keys]
        for start in range(0, len(full), self.delete_batch_size):
            batch = full[start:start + self.delete_batch_size]
            self._retry("delete", batch[0][len(self.prefix):], lambda _: self._delete_batch(batch))

    def _delete_batch(self, batch: list[str]) -> None:
        response = self._s3().delete_objects(
            Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True})
        errors = response.get("Errors", [])  # per-key failures come back in a 200 response
        if not errors:
            return
        first = errors[0]
        error = ClientError({"Error": {"Code": first.get("Code", ""), "Message": first.get("Message", "")},
                             "ResponseMetadata": {"HTTPStatusCode": 200}}, "DeleteObjects")
        if any(err.get("Code") in _TRANSIENT_CODES for err in errors):
            raise error  # transient: the whole batch again (deleting twice is harmless)
        raise StoreError(f"cannot delete {len(errors)} object(s), e.g. s3://{self.bucket}/{first.get('Key')}: "
                         f"{first.get('Code')} {first.get('Message')} (endpoint {self._endpoint()})")
