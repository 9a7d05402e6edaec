"""Every error that means "bad input" shares one base class, which the commands catch."""
from __future__ import annotations

import pytest

from move_scale.config.tree import ConfigError
from move_scale.core.errors import UserError
from move_scale.core.paths import InputError, OutputError
from move_scale.data.errors import DataError
from move_scale.data.ground_truth import GroundTruthError
from move_scale.evaluation.inference import InferenceError
from move_scale.harness.checkpoint import CheckpointError
from move_scale.harness.resume import ResumeError
from move_scale.harness.tracking import TrackingError
from move_scale.models.weights import WeightsError
from move_scale.stages.move.config import load_config


@pytest.mark.parametrize("cls", [ConfigError, DataError, CheckpointError, WeightsError,
                                 InferenceError, GroundTruthError, TrackingError, OutputError,
                                 InputError, ResumeError])
def test_input_errors_are_user_errors(cls):
    assert issubclass(cls, UserError)


def test_a_bad_key_is_caught_as_a_user_error():
    with pytest.raises(UserError, match="did you mean 'optim.seg.lr'"):
        load_config(None, ["optim.seg.lt=1e-4"])
