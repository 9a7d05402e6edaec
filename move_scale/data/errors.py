"""The error of the data layer: bad input for the shard tools and the streams (a path, a value, a
file, a shard that cannot deliver what its manifest promises)."""
from __future__ import annotations

from move_scale.core.errors import UserError


class DataError(UserError, ValueError):
    """Bad user input for the data tools (a path, a value, a file); the message says what to do."""
