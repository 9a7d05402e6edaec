"""A moto S3 server of one's own, for fault tests: pause (SIGSTOP), resume, kill, restart.

The session-wide server of `conftest.py` is shared by other tests and must never be paused; a fault
test starts its own here, on a free port of 127.0.0.1.

    with MotoServer() as server:
        server.upload(local_folder, "s3://bucket/prefix")
        server.pause(); server.resume(); server.kill(); server.start()   # same port again
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1", "NO_PROXY": "127.0.0.1,localhost",
               "no_proxy": "127.0.0.1,localhost"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def s3_env(**extra: str) -> dict:
    """os.environ with fake credentials, no proxies, one CPU thread (for subprocesses)."""
    env = dict(os.environ, **CREDENTIALS, OMP_NUM_THREADS="1", **extra)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "HTTP_PROXY", "HTTPS_PROXY", "http_proxy",
                 "https_proxy", "MLFLOW_TRACKING_URI"):
        env.pop(name, None)
    return env


class MotoServer:
    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> "MotoServer":
        binary = Path(sys.executable).with_name("moto_server")
        binary = str(binary) if binary.exists() else shutil.which("moto_server")
        self.process = subprocess.Popen([binary, "-H", "127.0.0.1", "-p", str(self.port)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        deadline = time.monotonic() + 30
        while True:
            try:
                opener.open(self.endpoint, timeout=1).close()
                return self
            except Exception:  # noqa: BLE001 - not up yet
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.kill()
                    raise RuntimeError(f"moto_server did not start on {self.endpoint}")
                time.sleep(0.1)

    def pause(self) -> None:
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.process.pid, signal.SIGCONT)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGCONT)
            self.process.kill()
            self.process.wait(timeout=10)

    def upload(self, folder: Path, url: str) -> None:
        """Create the bucket of `url` if needed and copy the files of `folder` below `url`."""
        import boto3

        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        client = boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                              aws_access_key_id="testing", aws_secret_access_key="testing")
        if bucket not in [b["Name"] for b in client.list_buckets().get("Buckets", [])]:
            client.create_bucket(Bucket=bucket)
        for path in sorted(Path(folder).rglob("*")):
            if path.is_file():
                key = f"{prefix}/{path.relative_to(folder).as_posix()}".lstrip("/")
                client.upload_file(str(path), bucket, key)

    def __enter__(self) -> "MotoServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.kill()
