"""The fault-injecting proxy itself: transparent for S3 clients, byte-exact for request bodies, and each fault kind
shows the client what it promises (a status, no answer, a flipped byte, a short body, a wait)."""

from __future__ import annotations

import http.client
import os
import socket
import threading
import time
from urllib.parse import urlsplit

import boto3
import pytest
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import ResponseStreamingError

from tarflow_testing.fault_proxy import FaultProxy

MiB = 1 << 20


def _conn(proxy: FaultProxy) -> http.client.HTTPConnection:
    url = urlsplit(proxy.url)
    return http.client.HTTPConnection(url.hostname, url.port, timeout=10)


def _request(proxy: FaultProxy, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
    conn = _conn(proxy)
    try:
        conn.request(method, path, body=body)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_transparent_for_boto3(s3_bucket, fault_proxy, tmp_path):
    s3 = boto3.client("s3")  # made after the fixture pointed AWS_ENDPOINT_URL at the proxy
    assert s3.meta.endpoint_url == fault_proxy.url
    data = os.urandom(300_000)
    s3.put_object(Bucket=s3_bucket, Key="a/b", Body=data, ChecksumAlgorithm="SHA256")
    assert s3.get_object(Bucket=s3_bucket, Key="a/b")["Body"].read() == data
    assert s3.head_object(Bucket=s3_bucket, Key="a/b")["ContentLength"] == len(data)  # HEAD keeps its length
    assert s3.get_object(Bucket=s3_bucket, Key="a/b", Range="bytes=10-19")["Body"].read() == data[10:20]
    big = tmp_path / "big"
    big.write_bytes(big_data := os.urandom(11 * MiB))
    config = TransferConfig(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB, max_concurrency=2)
    s3.upload_file(str(big), s3_bucket, "big", Config=config)
    s3.download_file(s3_bucket, "big", str(tmp_path / "back"), Config=config)
    assert (tmp_path / "back").read_bytes() == big_data
    assert [o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket)["Contents"]] == ["a/b", "big"]
    s3.delete_objects(Bucket=s3_bucket, Delete={"Objects": [{"Key": "a/b"}, {"Key": "big"}]})
    assert s3.list_objects_v2(Bucket=s3_bucket).get("KeyCount") == 0
    assert fault_proxy.faults == 0 and fault_proxy.count("PUT", "partNumber=") == 3
    assert fault_proxy.requests >= 12


def _echo_server() -> tuple[socket.socket, list[bytes]]:
    """An upstream that answers each request with the raw bytes it received (headers and chunked body)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    received: list[bytes] = []

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            raw = b""
            while not raw.endswith(b"\r\n0\r\n\r\n"):
                raw += conn.recv(65536)
            received.append(raw)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(raw) + raw)

    threading.Thread(target=serve, daemon=True).start()
    return listener, received


def test_chunked_request_body_is_forwarded_byte_exact():
    listener, received = _echo_server()
    with listener, FaultProxy(f"http://127.0.0.1:{listener.getsockname()[1]}") as proxy:
        conn = _conn(proxy)
        conn.request("PUT", "/bucket/key?x=1", body=iter([b"hello", b"chunked world!"]), encode_chunked=True,
                     headers={"Transfer-Encoding": "chunked", "Content-Encoding": "aws-chunked",
                              "Host": "client-chosen-host:1234"})
        response = conn.getresponse()
        echoed = response.read()
        conn.close()
    assert response.status == 200 and received == [echoed]
    head, _, body = echoed.partition(b"\r\n\r\n")
    assert body == b"5\r\nhello\r\nE\r\nchunked world!\r\n0\r\n\r\n"  # http.client's framing, as sent
    lines = head.split(b"\r\n")
    assert lines[0] == b"PUT /bucket/key?x=1 HTTP/1.1"
    assert [h for h in lines if h.lower().startswith(b"host:")] == [b"Host: client-chosen-host:1234"]  # as signed
    assert b"Transfer-Encoding: chunked" in lines and b"Content-Encoding: aws-chunked" in lines


def test_chunked_upload_reaches_s3(s3_bucket, fault_proxy):
    conn = _conn(fault_proxy)
    conn.request("PUT", f"/{s3_bucket}/chunky", body=iter([b"abc", b"defgh"]), encode_chunked=True,
                 headers={"Transfer-Encoding": "chunked"})
    assert conn.getresponse().read() is not None
    conn.close()
    assert boto3.client("s3").get_object(Bucket=s3_bucket, Key="chunky")["Body"].read() == b"abcdefgh"


def test_keep_alive_on_both_sides(s3_server):
    with FaultProxy(s3_server) as proxy:
        conn = _conn(proxy)
        for _ in range(3):
            conn.request("GET", "/")
            response = conn.getresponse()
            assert response.status == 200 and b"ListAllMyBucketsResult" in response.read()
            sock = conn.sock
            assert sock is not None
        assert conn.sock is sock  # no reconnect between requests
        conn.close()
        assert proxy.requests == 3


def test_fail_next_matches_method_and_path_and_counts_down(s3_bucket, fault_proxy):
    fault_proxy.fail_next(2, status=503, method="GET", path_contains="list-type")
    assert _request(fault_proxy, "GET", "/")[0] == 200  # path does not match
    assert _request(fault_proxy, "HEAD", f"/{s3_bucket}?list-type=2")[0] != 503  # method does not match
    status, body = _request(fault_proxy, "GET", f"/{s3_bucket}?list-type=2")
    assert status == 503 and b"<Code>SlowDown</Code>" in body
    assert _request(fault_proxy, "GET", f"/{s3_bucket}?list-type=2")[0] == 503
    assert _request(fault_proxy, "GET", f"/{s3_bucket}?list-type=2")[0] == 200  # used up
    assert fault_proxy.faults == 2 and fault_proxy.requests == 5
    assert [s.fault for s in fault_proxy.seen] == [None, None, "fail", "fail", None]
    assert fault_proxy.count("GET", "list-type", fault="fail") == 2


def test_fail_with_a_body_does_not_desync_keep_alive(s3_bucket, fault_proxy):
    # The failed request's body is read and discarded, so the next request on the connection parses cleanly.
    fault_proxy.fail_next(1, status=500, code="InternalError", method="PUT")
    conn = _conn(fault_proxy)
    conn.request("PUT", f"/{s3_bucket}/k", body=b"x" * 100_000)
    response = conn.getresponse()
    assert response.status == 500 and b"InternalError" in response.read()
    conn.request("PUT", f"/{s3_bucket}/k", body=b"y" * 10)
    assert conn.getresponse().status == 200
    conn.close()
    assert boto3.client("s3").get_object(Bucket=s3_bucket, Key="k")["Body"].read() == b"y" * 10


def test_fail_always_until_clear(s3_server):
    with FaultProxy(s3_server) as proxy:
        proxy.fail_always(500)
        assert [_request(proxy, "GET", "/")[0] for _ in range(3)] == [500, 500, 500]
        proxy.clear()
        assert _request(proxy, "GET", "/")[0] == 200
        assert proxy.faults == 3 and proxy.requests == 4


@pytest.mark.parametrize("after_bytes", [0, 1000])
def test_drop_closes_without_an_answer_and_forwards_nothing(s3_bucket, fault_proxy, after_bytes):
    fault_proxy.drop_next(1, method="PUT", after_bytes=after_bytes)
    with pytest.raises((http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)):
        _request(fault_proxy, "PUT", f"/{s3_bucket}/dropped", body=b"z" * 50_000)
    assert _request(fault_proxy, "HEAD", f"/{s3_bucket}/dropped")[0] == 404  # never reached S3
    assert fault_proxy.count(fault="drop") == 1


def test_lose_response_forwards_then_hangs_up(s3_bucket, fault_proxy):
    fault_proxy.lose_response_next(1, method="PUT")
    with pytest.raises((http.client.RemoteDisconnected, ConnectionResetError)):
        _request(fault_proxy, "PUT", f"/{s3_bucket}/landed", body=b"it happened")
    assert boto3.client("s3").get_object(Bucket=s3_bucket, Key="landed")["Body"].read() == b"it happened"


def _unchecked_client():
    # Without botocore's response checksum validation, so that the test sees the bytes as they arrived.
    return boto3.client("s3", config=Config(response_checksum_validation="when_required"))


def test_corrupt_flips_exactly_one_byte(s3_bucket, fault_proxy):
    s3 = _unchecked_client()
    s3.put_object(Bucket=s3_bucket, Key="obj", Body=(data := os.urandom(10_000)))
    fault_proxy.corrupt_next(1, method="GET", path_contains="/obj")
    body = s3.get_object(Bucket=s3_bucket, Key="obj")["Body"].read()
    assert len(body) == len(data) and [i for i in range(len(data)) if body[i] != data[i]] == [len(data) // 2]
    assert s3.get_object(Bucket=s3_bucket, Key="obj")["Body"].read() == data
    assert fault_proxy.count(fault="corrupt") == 1


def test_truncate_sends_half_the_body(s3_bucket, fault_proxy):
    s3 = _unchecked_client()
    s3.put_object(Bucket=s3_bucket, Key="obj", Body=b"q" * 1000)
    fault_proxy.truncate_next(1, path_contains="/obj")
    response = s3.get_object(Bucket=s3_bucket, Key="obj")
    assert response["ContentLength"] == 1000  # the headers promise it all
    with pytest.raises(ResponseStreamingError, match=r"IncompleteRead\(500 bytes read, 500 more expected\)"):
        response["Body"].read()


def test_delay_waits_before_forwarding(s3_server):
    with FaultProxy(s3_server) as proxy:
        proxy.delay_next(1, seconds=0.3)
        start = time.monotonic()
        assert _request(proxy, "GET", "/")[0] == 200
        assert time.monotonic() - start >= 0.3


def test_context_manager_points_the_environment_and_restores_it(s3_server):
    assert os.environ["AWS_ENDPOINT_URL"] == s3_server
    with FaultProxy(s3_server) as proxy:
        assert os.environ["AWS_ENDPOINT_URL"] == os.environ["S3_ENDPOINT_URL"] == proxy.url != s3_server
        address = urlsplit(proxy.url).hostname, urlsplit(proxy.url).port
    assert os.environ["AWS_ENDPOINT_URL"] == os.environ["S3_ENDPOINT_URL"] == s3_server
    with pytest.raises(ConnectionRefusedError):  # stopped
        socket.create_connection(address, timeout=1)


def test_upstream_down_gives_502(s3_server):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with FaultProxy(f"http://127.0.0.1:{port}") as proxy:
        status, body = _request(proxy, "GET", "/")
    assert status == 502 and b"upstream" in body
