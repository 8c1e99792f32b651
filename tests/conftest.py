import contextlib
import fcntl
import os
import tempfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def golden_path() -> Path:
    shared = Path(os.environ.get("TARFLOW_SHARED", REPO.parent / "shared"))
    return shared / "golden" / "golden_tarflow.pt"


@pytest.fixture(scope="session")
def golden():
    path = golden_path()
    if not path.exists():
        pytest.fail(f"golden file not found at {path}; set TARFLOW_SHARED to the folder holding golden/")
    return torch.load(path, weights_only=True)


@contextlib.contextmanager
def _machine_lock(name: str, exclusive: bool = True):
    """An flock on a file of the machine's temp dir: held across the pytest workers (and any other process)."""
    with open(Path(tempfile.gettempdir()) / name, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@pytest.fixture(autouse=True)
def _alone_when_timing_matters(request):
    """Tests marked ``alone`` run while no other test runs on any pytest worker: their kills and second signals land
    in windows of a fraction of a second, which a second test file running beside them moves. Every other test
    holds a shared lock; an ``alone`` test takes it exclusively. The gate, held only while a lock is requested,
    gives an exclusive request precedence: the other worker cannot keep taking its shared lock back between tests."""
    alone = request.node.get_closest_marker("alone") is not None
    stack = contextlib.ExitStack()
    with _machine_lock("tarflow-tests-gate.lock"):
        stack.enter_context(_machine_lock("tarflow-tests-alone.lock", exclusive=alone))
    with stack:
        yield


@pytest.fixture(autouse=True)
def _one_streaming_dataset_starting_at_a_time(request):
    """Tests marked ``streaming`` (they build MDS loaders, in-process or in the processes they start) hold one lock
    across the test workers. streaming registers each dataset's shared memory under the lowest free prefix of the
    machine, found by a scan and then created: two processes starting a dataset at the same moment pick the same
    prefix and one fails (``File exists: '/000123_locals'``). The pytest workers are such processes."""
    if request.node.get_closest_marker("streaming") is None:
        yield
        return
    with _machine_lock("tarflow-tests-streaming.lock"):
        yield


@pytest.fixture(autouse=True)
def _deterministic_threads():
    # The golden data were made with 1 thread; more threads move sampling outputs by ~1e-6.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 endpoint on loopback (moto's server mode) for the whole session: returns its URL."""
    from tarflow_testing.local_s3 import local_s3

    with local_s3() as url:
        yield url


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh, empty bucket per test: returns its name."""
    import uuid

    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return name


@pytest.fixture
def fault_proxy(s3_server):
    """A FaultProxy in front of the moto server, with AWS_ENDPOINT_URL pointing at it for the test (restored after).
    Ask for ``s3_bucket`` before it if the bucket should be made without going through the proxy."""
    from tarflow_testing.fault_proxy import FaultProxy

    with FaultProxy(s3_server) as proxy:
        yield proxy


@pytest.fixture(scope="session")
def fid_weights(tmp_path_factory):
    """A directory with random FID Inception weights in each library's own file layout and name (torch-fidelity's
    for the paper convention, pytorch-fid's), built once per session: ``--inception DIR`` for either convention."""
    from tarflow_testing.evaluation import random_weight_files

    return random_weight_files(tmp_path_factory.mktemp("fid-weights"))


@pytest.fixture(scope="session")
def digits_classifier(tmp_path_factory):
    """The quality metrics' digits classifier, trained once per session by its command: the file's path."""
    from tarflow.main import main

    path = tmp_path_factory.mktemp("classifier") / "digits.pt"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # session fixtures come before the per-test one thread; a loaded machine oversubscribes
    try:
        assert main(["eval", "classifier", "train", "digits", "--out", str(path)]) == 0
    finally:
        torch.set_num_threads(threads)
    return path
