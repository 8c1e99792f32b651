"""The one S3 client factory and retry policy of the project: dataset reads and writes here, checkpoint stores in
``trainer.stores.s3`` (which imports this module; nothing here imports anything of ours).

Endpoint and credentials come only from the standard AWS chain (AWS_ENDPOINT_URL, AWS_PROFILE, AWS_ACCESS_KEY_ID,
~/.aws/config, instance roles …) unless a caller names an endpoint; nothing S3-specific is read from our configs.

Retry policy: botocore's ``standard`` mode (retries throttling, 5xx and connection errors with exponential backoff
and full jitter, capped at 20 s, under a client-wide retry quota), with ``attempts`` counting every try of a request,
the first included (botocore's ``total_max_attempts``; ``attempts=1`` means no retry at all). The default, 6 tries, is
what dataset reads always had; a caller that retries whole operations itself (the checkpoint store) asks for fewer.
"""

from __future__ import annotations

import functools
import os

DEFAULT_ATTEMPTS = 6          # tries of one request, the first included
CONNECT_TIMEOUT = 10.0        # seconds
READ_TIMEOUT = 60.0           # seconds
MAX_POOL_CONNECTIONS = 16     # enough for parallel multipart transfers


def retry_config(attempts: int = DEFAULT_ATTEMPTS, *, connect_timeout: float = CONNECT_TIMEOUT,
                 read_timeout: float = READ_TIMEOUT):
    """The botocore ``Config`` every client of ours is made with."""
    from botocore.config import Config

    if attempts < 1:
        raise ValueError(f"S3 request attempts must be >= 1, got {attempts}")
    return Config(retries={"mode": "standard", "total_max_attempts": int(attempts)}, connect_timeout=connect_timeout,
                  read_timeout=read_timeout, max_pool_connections=MAX_POOL_CONNECTIONS)


@functools.lru_cache(maxsize=None)
def _client(pid: int, environment: tuple[str, str, str], endpoint_url: str | None, attempts: int,
            connect_timeout: float, read_timeout: float):
    import boto3

    config = retry_config(attempts, connect_timeout=connect_timeout, read_timeout=read_timeout)
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url, config=config)


def s3_client(endpoint_url: str | None = None, *, attempts: int = DEFAULT_ATTEMPTS,
              connect_timeout: float = CONNECT_TIMEOUT, read_timeout: float = READ_TIMEOUT):
    """A boto3 S3 client with our retry policy, shared by the callers of one process that ask for the same.

    One client per process (boto3 clients are not fork-safe: loader workers get their own through the pid) and per
    endpoint/credentials seen in the environment, which boto3 reads when the client is made."""
    env = os.environ
    environment = (env.get("AWS_ENDPOINT_URL", ""), env.get("AWS_ENDPOINT_URL_S3", ""),
                   env.get("AWS_ACCESS_KEY_ID", ""))
    return _client(os.getpid(), environment, endpoint_url, int(attempts), float(connect_timeout), float(read_timeout))


def clear_s3_clients() -> None:
    """Forget the clients made so far (the next call makes new ones, reading the environment again)."""
    _client.cache_clear()

