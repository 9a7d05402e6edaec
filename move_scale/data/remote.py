"""Remote reads that neither hang nor give up at the first blip: timeouts, retries, resumed reads.

    policy = ReadPolicy(connect_timeout_s=10, read_timeout_s=15, retry_window_s=120)
    options = remote_options("s3://bucket/x/manifest.json", "http://minio:9000", policy)
    with RetryingFile(url, options, policy) as f:     # a read-only byte stream
        data = f.read()                                # same bytes as an undisturbed read

Every request has the policy's connect and read timeouts (s3fs/aiobotocore `config_kwargs`,
aiohttp `ClientTimeout` for http(s)). botocore's own retries are switched off and every s3fs
filesystem of the data path makes one try per request (`filesystem`): s3fs nests its default 5
tries inside range reads (25 requests, 25 × read_timeout_s before one read fails), and one clock
must decide. A read that fails with a timeout, a refused or dropped connection, or a
5xx/throttling answer (`is_transient`) is retried with backoff, reopening the file at the byte
where it broke off, until the store has been silent for `retry_window_s`; then `DataError` names
the endpoint and the file. A stall inside the window therefore leaves the bytes read, and
everything made from them, identical to an undisturbed read; a read gives up at most about the
window plus one attempt (two requests, each with its connect and read timeouts) after the store
went silent.
Missing files, denied access and other answers that a retry cannot change are raised at once.
"""
from __future__ import annotations

import errno
import io
import logging
import time
from dataclasses import dataclass
from typing import Callable, TypeVar

import fsspec

from move_scale.config.cli_args import number
from move_scale.config.rules import Range
from move_scale.config.sections import DataConfig
from move_scale.data.errors import DataError

log = logging.getLogger(__name__)

T = TypeVar("T")

_TRANSIENT_ERRNOS = {errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED,
                     errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETDOWN, errno.EPIPE,
                     errno.EAGAIN, errno.EBUSY, errno.EREMOTEIO}
_TRANSIENT_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout",
                    "InternalError", "ServiceUnavailable", "RequestTimeTooSkewed"}


@dataclass(frozen=True)
class ReadPolicy:
    """Timeouts and the retry window of remote reads (the `data.*` keys of the same names)."""

    connect_timeout_s: float = DataConfig.connect_timeout_s  # the config's defaults: 10, 15, 120 s
    read_timeout_s: float = DataConfig.read_timeout_s
    retry_window_s: float = DataConfig.retry_window_s
    window_key: str = "data.retry_window_s"  # how the user sets the window, for messages

    def __post_init__(self) -> None:
        for name in ("connect_timeout_s", "read_timeout_s", "retry_window_s"):
            if not getattr(self, name) > 0:
                raise DataError(f"data.{name} must be > 0 seconds, got {getattr(self, name)}")


def add_policy_arguments(parser) -> None:
    """--read-timeout / --retry-window on a command line (move-shard, evaluate)."""
    defaults, seconds = ReadPolicy(), number(float, Range(0.0, low_open=True))
    parser.add_argument("--read-timeout", type=seconds, default=defaults.read_timeout_s,
                        metavar="SECONDS", help="abandon and retry a remote request that gets no "
                        f"answer for this long (default {defaults.read_timeout_s:g})")
    parser.add_argument("--retry-window", type=seconds, default=defaults.retry_window_s,
                        metavar="SECONDS", help="retry a silent store this long, then stop with "
                        f"one line naming it (default {defaults.retry_window_s:g})")


def policy_from_args(args) -> ReadPolicy:
    return ReadPolicy(read_timeout_s=args.read_timeout, retry_window_s=args.retry_window,
                      window_key="--retry-window")


def filesystem(url: str, options: dict | None):
    """(fsspec filesystem, path) for `url`; an s3fs one makes a single try per request (above)."""
    fs, path = fsspec.core.url_to_fs(url, **(options or {}))
    if protocol_of(url) in ("s3", "s3a"):
        fs.retries = 1  # s3fs's documented class attribute, set on our own configured instance
    return fs, path


def protocol_of(url: str) -> str:
    return url.split("://", 1)[0].lower() if "://" in url else "file"


def remote_options(url: str, endpoint_url: str | None = None,
                   policy: ReadPolicy | None = None) -> dict:
    """fsspec storage options for `url`: the S3 endpoint when given, and the policy's timeouts."""
    policy = policy or ReadPolicy()
    protocol = protocol_of(url)
    if protocol in ("s3", "s3a"):
        options: dict = {"config_kwargs": {
            "connect_timeout": policy.connect_timeout_s, "read_timeout": policy.read_timeout_s,
            "retries": {"total_max_attempts": 1}}}
        if endpoint_url:
            options["client_kwargs"] = {"endpoint_url": endpoint_url}
        return options
    if protocol in ("http", "https"):
        import aiohttp

        timeout = aiohttp.ClientTimeout(sock_connect=policy.connect_timeout_s,
                                        sock_read=policy.read_timeout_s)
        return {"client_kwargs": {"timeout": timeout}}
    return {}


def endpoint_of(url: str, options: dict | None) -> str:
    """Where `url` is read from, in words: the S3 endpoint, the web host or local disk."""
    protocol = protocol_of(url)
    options = options or {}
    if protocol in ("s3", "s3a"):
        endpoint = (options.get("client_kwargs") or {}).get("endpoint_url") or options.get("endpoint_url")
        return f"S3 endpoint {endpoint}" if endpoint else "the default AWS S3 endpoint"
    if protocol == "file":
        return "local disk"
    host = url.split("://", 1)[1].split("/", 1)[0]
    return f"{protocol}://{host}"


def _client_error_transient(err: BaseException) -> bool:
    response = getattr(err, "response", None)
    if not isinstance(response, dict):
        return False
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
    return status >= 500 or response.get("Error", {}).get("Code") in _TRANSIENT_CODES


def is_transient(err: BaseException) -> bool:
    """True for failures a retry can cure: timeouts, connection errors, 5xx and throttling."""
    if isinstance(err, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(err, (TimeoutError, ConnectionError)):
        return True
    if isinstance(err, IndexError) and isinstance(err.__context__, OSError):
        # s3fs's S3File._fetch_range reads `args[0]` of the OSError it caught: a timeout raised
        # without arguments comes out as this IndexError. Judge the failure it was handling.
        return is_transient(err.__context__)
    if _client_error_transient(err) or _client_error_transient(err.__cause__):
        return True
    module = type(err).__module__
    if module.startswith(("botocore", "aiohttp", "fsspec.exceptions", "urllib3")):
        try:
            import aiohttp
            from botocore.exceptions import ConnectionError as BotoConnectionError
            from botocore.exceptions import HTTPClientError
            from fsspec.exceptions import FSTimeoutError
        except ImportError:  # pragma: no cover - s3fs brings them all
            return False
        if isinstance(err, aiohttp.ClientResponseError):
            return err.status >= 500 or err.status == 429
        return isinstance(err, (BotoConnectionError, HTTPClientError, aiohttp.ClientError,
                                FSTimeoutError))
    return isinstance(err, OSError) and err.errno in _TRANSIENT_ERRNOS


def _one_line(err: BaseException) -> str:
    return " ".join(f"{type(err).__name__}: {err}".split())


class Retry:
    """The clock of one read: silent since when, how long to wait next, when to give up."""

    def __init__(self, what: str, url: str, options: dict | None, policy: ReadPolicy):
        self.what, self.url, self.options, self.policy = what, url, options, policy
        self.failing_since: float | None = None
        self.attempt = 0

    def progressed(self) -> None:
        self.failing_since, self.attempt = None, 0

    def failed(self, err: BaseException) -> None:
        """Sleep before the next attempt, or raise DataError when the window has passed."""
        now = time.monotonic()
        if self.failing_since is None:
            self.failing_since = now
        silent = now - self.failing_since
        endpoint = endpoint_of(self.url, self.options)
        if silent >= self.policy.retry_window_s:
            raise DataError(
                f"{endpoint} did not answer for {silent:.0f} s ({self.policy.window_key}="
                f"{self.policy.retry_window_s:g}) while {self.what} {self.url} ({_one_line(err)}); "
                "check that the store is up and the endpoint is right, then rerun (training "
                "resumes from its last checkpoint)") from None
        delay = min(0.5 * 2 ** self.attempt, 10.0, self.policy.retry_window_s - silent)
        self.attempt += 1
        log.warning("%s %s from %s failed (%s); retrying in %.1f s, for up to %.0f s more",
                    self.what, self.url, endpoint, _one_line(err), delay,
                    self.policy.retry_window_s - silent)
        time.sleep(max(delay, 0.0))


def _no_credentials(err: BaseException) -> bool:
    try:
        from botocore.exceptions import NoCredentialsError
    except ImportError:  # pragma: no cover - s3fs brings it
        return False
    return isinstance(err, NoCredentialsError)


def _retried(clock: Retry, call: Callable[[], T], before_retry: Callable[[], None] | None = None) -> T:
    """`call()` until it succeeds, fails for good, or `clock` gives up (DataError)."""
    while True:
        try:
            return call()
        except Exception as err:  # noqa: BLE001 - sorted by is_transient
            if _no_credentials(err):
                raise DataError(
                    f"no credentials for {clock.url} ({endpoint_of(clock.url, clock.options)}): set "
                    "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE") from err
            if not is_transient(err):
                raise
            if before_retry is not None:
                before_retry()
            clock.failed(err)


def retrying(what: str, url: str, options: dict | None, policy: ReadPolicy,
             call: Callable[[], T]) -> T:
    """`call()` retried under `policy` while it fails transiently (see the module docstring)."""
    return _retried(Retry(what, url, options, policy), call)


class RetryingFile(io.RawIOBase):
    """A read-only stream of `url` that reopens at the current byte after a transient failure."""

    def __init__(self, url: str, options: dict | None, policy: ReadPolicy,
                 what: str = "reading"):
        super().__init__()
        self.url, self.options, self.policy = url, options or {}, policy
        self.position = 0
        self._file = None
        self._clock = Retry(what, url, self.options, policy)
        self._file = self._attempt(self._open)  # a missing file fails here, at once

    def __repr__(self) -> str:
        return self.url

    def _open(self):
        fs, path = filesystem(self.url, self.options)
        handle = fs.open(path, "rb")
        if self.position:
            handle.seek(self.position)
        return handle

    def _attempt(self, call: Callable[[], T]) -> T:
        return _retried(self._clock, call, before_retry=self._drop)  # reopened at self.position

    def _drop(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except Exception:  # noqa: BLE001 - a broken connection may not close cleanly
                pass
            self._file = None

    def _read(self, size: int) -> bytes:
        if self._file is None:
            self._file = self._open()
        data = self._file.read(size)
        self.position += len(data)
        self._clock.progressed()
        return data

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        return self._attempt(lambda: self._read(size))

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self._drop()
        super().close()
