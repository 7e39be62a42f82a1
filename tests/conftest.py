"""Shared fixtures: one tiny phantom store per test session (built in-process, no Ray) and a local
S3-compatible server (moto's server mode on 127.0.0.1)."""
from __future__ import annotations

import socket

import pytest

#: Studies in the session's phantom: enough for the trainer's learning check (about 60 validation
#: studies, a third Cardiomegaly-positive), small enough to build in seconds at 32 and 64 px.
TINY_PHANTOM_STUDIES = 300
TINY_PHANTOM_RESOLUTIONS = (32, 64)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module: the test machine's few cores are shared (oversubscription
    made tiny forward passes up to 20x slower), and exact equality between runs holds for a fixed
    thread count (float reductions split over threads sum in another order)."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_phantom_images(tmp_path_factory):
    """A tiny phantom dataset (image root with train.csv/valid.csv), 64-96 px sources."""
    from preprocessing.phantom import make_phantom
    root = tmp_path_factory.mktemp("tiny-phantom")
    make_phantom(str(root), studies=TINY_PHANTOM_STUDIES, seed=0, min_size=64, max_size=96,
                 workers=2)
    return root


@pytest.fixture(scope="session")
def tiny_phantom_store(tmp_path_factory, tiny_phantom_images):
    """Location (str) of a store built from the tiny phantom at resolutions 32 and 64."""
    from preprocessing.build import build_store
    out = tmp_path_factory.mktemp("tiny-store") / "store"
    root = tiny_phantom_images
    build_store(str(root), [str(root / "train.csv"), str(root / "valid.csv")], str(out),
                resolutions=TINY_PHANTOM_RESOLUTIONS, use_ray=False, progress=False)
    return str(out)


#: Buckets the S3 fixture creates: the store tests, the sweep tests and the node-cache tests.
S3_BUCKETS = ("stores", "sweeps", "cxr")


@pytest.fixture
def s3_endpoint(monkeypatch):
    """``(host:port, boto3 client)`` of a moto S3 server on 127.0.0.1 with S3_BUCKETS created;
    dummy credentials, no instance-metadata lookups. Use as
    ``s3://BUCKET/prefix?endpoint_override=HOST:PORT&scheme=http``."""
    moto_server = pytest.importorskip("moto.server")
    boto3 = pytest.importorskip("boto3")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1")
        for bucket in S3_BUCKETS:
            client.create_bucket(Bucket=bucket)
        yield f"127.0.0.1:{port}", client
    finally:
        server.stop()
