"""Argument types for the ``diffusion-np train <task>`` options: strings in, checked numbers out.

Each is an ``argparse`` ``type=``: it turns the option's text into a number or raises
``argparse.ArgumentTypeError``, which argparse prints as ``argument --lr: must be ...``
and exits with status 2, before any model is built. The task configs check the same
bounds again in ``__post_init__`` (with a ValueError), for configs made in Python.

:func:`field_defaults` reads a config dataclass's defaults for the ``--help`` texts.
"""

from __future__ import annotations

import argparse
import dataclasses
import math

__all__ = [
    "at_least_one",
    "field_defaults",
    "fraction",
    "nonnegative_float",
    "nonnegative_int",
    "positive_float",
    "positive_int",
]


def positive_float(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return value


def nonnegative_float(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def fraction(text: str) -> float:
    """A number in [0, 1) (a probability that must leave something: caption dropout)."""
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def at_least_one(text: str) -> float:
    """A number >= 1 (a classifier-free guidance weight: 1 is no guidance)."""
    value = float(text)
    if not (math.isfinite(value) and value >= 1.0):
        raise argparse.ArgumentTypeError(f"must be a number >= 1, got {text}")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def nonnegative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def field_defaults(config_class) -> argparse.Namespace:
    """The dataclass's field defaults (for --help texts) without running its __post_init__."""
    return argparse.Namespace(**{f.name: f.default for f in dataclasses.fields(config_class)})
