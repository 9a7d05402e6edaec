"""Argument types for the commands' parsers: a bad value is an argparse error that names the option
and the value (`error: argument --batch-size: 0: use a value ≥ 1`), before any work starts."""
from __future__ import annotations

import argparse
from typing import Callable

from move_scale.config.rules import Range


def number(kind: type, rule: Range) -> Callable[[str], float]:
    """An int or float option whose value must pass `rule`, e.g. number(int, Range(1))."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        problem = rule(value)
        if problem is not None:
            raise argparse.ArgumentTypeError(f"{text}: {problem}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def device(text: str) -> str:
    """A torch device this machine has: cpu, cuda, cuda:1, mps."""
    import torch

    try:
        parsed = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device; use cpu, cuda, cuda:1 or mps") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text}: no CUDA device here; use cpu")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text}: this machine has {torch.cuda.device_count()} CUDA devices")
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{text}: no MPS device here; use cpu")
    return text
