"""A real S3 protocol server (moto) on loopback, for the tests that write or read stores in a bucket."""

import contextlib
import os
import socket
import uuid
from collections.abc import Iterator


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def moto_bucket() -> Iterator[tuple[str, dict]]:
    """A fresh bucket on a moto server: its s3:// URL, and the environment variables that reach it (also
    set in this process while the server runs)."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
    }
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    bucket = f"team-stores-{uuid.uuid4().hex[:8]}"
    s3fs.S3FileSystem().mkdir(bucket)
    try:
        yield f"s3://{bucket}", env
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def objects(url: str) -> dict[str, bytes]:
    """Every object under `url`, by its path relative to it."""
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.invalidate_cache()  # listings are cached, and the bucket changes under the tests
    root = url.removeprefix("s3://").rstrip("/")
    return {path[len(root) + 1 :]: fs.cat_file(path) for path in fs.find(root)}


# measure_s3_streaming's sizes for tests (benchmarks/scale_s3.py): a few seconds in all, every part run,
# the collect straight to S3 included (its default collects half a million tokens of d 576)
TINY_S3_MEASUREMENT = dict(
    d_model=32,
    chunk_rows=1024,
    n_chunks=12,
    batch_size=1024,
    width=64,
    k=4,
    train_steps=4,
    rounds=2,
    collect_tokens=8192,
    collect_width=16,
)
