"""Which read failures the object-store path retries (data/remote.is_transient).

The fault tests in test_remote_faults.py pause a real moto server; these pin the classification
they rely on, including an s3fs quirk met there: S3File._fetch_range inspects `args[0]` of the
OSError it caught, so a timeout raised without arguments reaches us as an IndexError.
"""
from __future__ import annotations

import errno

import pytest

from move_scale.data.remote import is_transient


def _through_s3fs_handler(cause: OSError) -> IndexError:
    """The exception s3fs's handler raises while looking at `cause` (its `ex.args[0]`)."""
    try:
        try:
            raise cause
        except OSError as ex:
            ex.args[0]  # noqa: B018 - the lookup s3fs makes
    except IndexError as err:
        return err
    raise AssertionError("the cause had arguments")


@pytest.mark.parametrize("err, transient", [
    (TimeoutError(), True),
    (ConnectionResetError(), True),
    (OSError(errno.ECONNRESET, "reset"), True),
    (FileNotFoundError("s3://bucket/missing.tar"), False),
    (PermissionError("denied"), False),
    (ValueError("bad header"), False),
    (IndexError("a bug of ours"), False),
])
def test_timeouts_and_resets_are_retried_and_missing_or_bad_data_is_not(err, transient):
    assert is_transient(err) is transient


def test_a_timeout_that_s3fs_turns_into_an_index_error_is_retried():
    assert is_transient(_through_s3fs_handler(TimeoutError()))
    assert not is_transient(_through_s3fs_handler(FileNotFoundError()))
