"""A dataset folder on local disk or any fsspec store, with atomic writes.

Atomicity: a file appears under its final name only when complete.
- local disk: written to ``.NAME.PID.tmp`` in the same folder, fsynced, then ``os.replace``d;
- object stores (s3, gs, az): the completed local file is uploaded in one put (an object becomes
  visible only when its upload, multipart or not, completes);
- other fsspec stores: uploaded to a temporary name, then moved.

Remote operations are retried under a `remote.ReadPolicy` while they fail transiently (timeouts,
lost connections); past its window they end in one `DataError` naming the endpoint.
"""
from __future__ import annotations

import os
import posixpath
import tempfile
from contextlib import contextmanager
from typing import Iterator

from fsspec.implementations.local import LocalFileSystem

from move_scale.data.errors import DataError
from move_scale.data.remote import ReadPolicy, filesystem, remote_options, retrying

_OBJECT_STORES = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl"}


def storage_options_for(url: str, endpoint_url: str | None = None, policy=None) -> dict:
    """fsspec storage options for ``url``: the S3 endpoint when one is given, and the timeouts of
    ``policy`` (a `remote.ReadPolicy`; its defaults when None)."""

    return remote_options(url, endpoint_url, policy)


class OutputDir:
    """The folder OUT (a local path or an fsspec URL) and the few operations the writer needs."""

    def __init__(self, url: str, storage_options: dict | None = None, policy=None):
        self.url = url.rstrip("/")
        self.storage_options, self.policy = storage_options, policy

        try:
            self.fs, root = filesystem(self.url, storage_options)
        except (ValueError, ImportError) as err:
            raise DataError(f"OUT {url!r} is not a usable path or URL: {err}") from err
        self.root = root.rstrip("/")
        self.is_local = isinstance(self.fs, LocalFileSystem)
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        self.is_object_store = bool(_OBJECT_STORES.intersection(protocols))

    def path(self, name: str) -> str:
        return posixpath.join(self.root, name) if not self.is_local else os.path.join(self.root, name)

    def _remote(self, what: str, name: str, call):
        """`call()`, retried on transient failures when OUT is remote (see the module docstring)."""
        if self.is_local:
            return call()

        return retrying(what, f"{self.url}/{name}", self.storage_options,
                        self.policy or ReadPolicy(), call)

    def check_writable(self) -> None:
        """Create the folder and write/delete a probe file; DataError naming OUT otherwise."""
        probe = "_progress/.write-probe"
        try:
            if self.is_local:
                os.makedirs(os.path.join(self.root, "_progress"), exist_ok=True)
            self.write_bytes(probe, b"probe")
            self.delete(probe)
            if self.is_local and not os.listdir(os.path.join(self.root, "_progress")):
                os.rmdir(os.path.join(self.root, "_progress"))
        except DataError:
            raise
        except Exception as err:  # noqa: BLE001 - any failure here means "cannot write there"
            raise DataError(f"OUT {self.url!r} is not writable ({type(err).__name__}: {err}); "
                            "check the path, the bucket and the credentials") from err

    def temp_path(self, name: str) -> str:
        """A local path to write ``name`` into before :meth:`publish`."""
        if self.is_local:
            folder = os.path.dirname(self.path(name))
            os.makedirs(folder, exist_ok=True)
            return os.path.join(folder, f".{os.path.basename(name)}.{os.getpid()}.tmp")
        handle, tmp = tempfile.mkstemp(suffix=".tmp", prefix="move-shard-")
        os.close(handle)
        return tmp

    def publish(self, tmp: str, name: str) -> None:
        """Make the complete local file ``tmp`` appear as ``name`` in one step (see module doc)."""
        try:
            if self.is_local:
                with open(tmp, "rb") as handle:
                    os.fsync(handle.fileno())
                os.replace(tmp, self.path(name))
                return
            final = self.path(name)
            if self.is_object_store:
                self._remote("uploading", name, lambda: self.fs.put_file(tmp, final))
            else:
                partial = f"{final}.{os.getpid()}.tmp"
                self._remote("uploading", name, lambda: self.fs.put_file(tmp, partial))
                self._remote("renaming", name, lambda: self.fs.mv(partial, final))
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    @contextmanager
    def staged(self, name: str) -> Iterator[str]:
        """Yield a local path to write ``name`` into; publish it atomically when the block exits."""
        tmp = self.temp_path(name)
        try:
            yield tmp
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
        self.publish(tmp, name)

    def write_bytes(self, name: str, data: bytes) -> None:
        with self.staged(name) as tmp:
            with open(tmp, "wb") as handle:
                handle.write(data)

    def read_bytes(self, name: str) -> bytes:
        def read() -> bytes:
            with self.fs.open(self.path(name), "rb") as handle:
                return handle.read()

        return self._remote("reading", name, read)

    def size(self, name: str) -> int | None:
        """Bytes of ``name``, None when it does not exist."""
        try:
            return int(self._remote("checking", name, lambda: self.fs.size(self.path(name))))
        except OSError:  # FileNotFoundError and answers a retry cannot change
            return None

    def exists(self, name: str) -> bool:
        return self.size(name) is not None

    def list(self, folder: str) -> list[str]:
        """Names (relative to ``folder``) of the files directly inside it; [] when absent."""
        try:
            entries = self._remote("listing", folder,
                                   lambda: self.fs.ls(self.path(folder), detail=False))
        except OSError:
            return []
        return sorted(posixpath.basename(entry.rstrip("/")) for entry in entries)

    def delete(self, name: str) -> None:
        try:
            self._remote("deleting", name, lambda: self.fs.rm(self.path(name)))
        except FileNotFoundError:
            pass
