"""The one base class of errors that mean "the user's input or setting is wrong".

Every command catches `UserError`, prints `error: <message>` on one line and exits 2; anything
else is a bug or an outage and keeps its traceback. The subclasses live where they arise
(`config.ConfigError`, `data.storage.DataError` and its `data.ground_truth.GroundTruthError`,
`checkpoint.CheckpointError`, `weights.WeightsError`, `evaluation.inference.InferenceError`, ...)
and keep their older builtin bases so existing `except ValueError` callers still work.
"""
from __future__ import annotations


class UserError(Exception):
    """Bad input or settings; the message names the key, path or value and says what to do."""


def report(err: BaseException, prefix: str = "") -> int:
    """Print `err` as one line `[prefix: ]error: <message>` on stderr; returns 2, the exit code of
    a user error."""
    import sys

    text = " ".join(str(err).split())  # MLflow and torch messages may span lines
    print(f"{prefix + ': ' if prefix else ''}error: {text}", file=sys.stderr)
    return 2
