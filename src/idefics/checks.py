"""Dataclass fields checked against their own definition: the annotated type and the limits in the field's
metadata. A class states each field once (`limited(...)`), and `check()` holds every instance to it."""
from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import reprlib
import types
import typing
from typing import Literal, Union


class FieldError(Exception):
    """A field's value breaks its definition; the owner turns it into its own one-line error."""

    def __init__(self, name: str, problem: str):
        super().__init__(f"{name} {problem}")
        self.name, self.problem = name, problem


def limited(default=dataclasses.MISSING, *, low=None, high=None, above=None, items=None, chars=None,
            choices=None, **field_options):
    """A dataclass field with limits: low / high inclusive and above exclusive for numbers, choices for any value
    (on a list these apply to each element); items: most list elements; chars: longest string."""
    limits = dict(low=low, high=high, above=above, items=items, chars=chars, choices=choices)
    return dataclasses.field(default=default, metadata={"limits": limits}, **field_options)


def check(obj) -> None:
    """Hold each init field of a dataclass instance to its definition, normalizing in place what fits (an
    integral number -> int, a real one for a float -> float, a tuple for a list -> list). Raises FieldError."""
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        if f.init:
            value = getattr(obj, f.name)
            setattr(obj, f.name, checked(f.name, value, hints[f.name], f.metadata.get("limits", {})))


def checked(name: str, value, kind, limits: dict):
    """value held to the type `kind` and the limits -> value normalized."""
    try:
        value = _coerce(kind, value)
    except _Mismatch:
        raise FieldError(name, f"must be {describe(kind)}, got {show(value)}") from None
    if limits.get("items") is not None and isinstance(value, list) and len(value) > limits["items"]:
        raise FieldError(name, f"takes at most {limits['items']} items, got {len(value)}")
    for x in value if isinstance(value, list) else [value]:
        if problem := _outside(x, limits):
            raise FieldError(name, f"{problem}, got {show(x)}")
    return value


def show(value) -> str:
    """A short repr for messages: a long string or list is cut, a lone surrogate escaped."""
    return reprlib.repr(value)


class _Mismatch(Exception):
    pass


@functools.cache
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _coerce(kind, value):
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (Union, types.UnionType):
        for option in args:
            try:
                return _coerce(option, value)
            except _Mismatch:
                pass
        raise _Mismatch
    if origin is Literal:
        if any(type(value) is type(a) and value == a for a in args):
            return value
        raise _Mismatch
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        return [_coerce(args[0], x) for x in value]
    if kind is type(None):
        if value is None:
            return value
        raise _Mismatch
    # bool is an int to Python, never to a user: True tokens or a temperature of True is a mistake.
    if kind is int and isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    if kind is float and isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    if kind in (int, float):
        raise _Mismatch
    if isinstance(value, kind):
        return value
    raise _Mismatch


def _outside(x, limits: dict) -> str | None:
    """What is wrong with one value (a list's element) under the limits, or None."""
    if limits.get("choices") is not None and x not in limits["choices"]:
        return f"must be one of {', '.join(map(str, limits['choices']))}"
    if isinstance(x, str):
        if limits.get("chars") is not None and len(x) > limits["chars"]:
            return f"must be at most {limits['chars']} characters long"
        return None
    if not isinstance(x, (int, float)) or isinstance(x, bool):
        return None
    low, high, above = limits.get("low"), limits.get("high"), limits.get("above")
    if (low is not None and x < low) or (high is not None and x > high) or (above is not None and x <= above):
        if low is not None and high is not None:
            return f"must be from {low} to {high}"
        bounds = [f"above {above}" if above is not None else None, f"at least {low}" if low is not None else None,
                  f"at most {high}" if high is not None else None]
        return "must be " + " and ".join(b for b in bounds if b)
    return None


_NAMES = {int: ("an integer", "integers"), float: ("a finite number", "finite numbers"), str: ("a string", "strings"),
          bool: ("True or False", "booleans"), type(None): ("None", "None")}


def describe(kind, plural: bool = False) -> str:
    """The type in words: int | list[int] | None -> "an integer, a list of integers or None"."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (Union, types.UnionType):
        words = [describe(a) for a in args]
        return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]
    if origin is Literal:
        return " or ".join(repr(a) for a in args)
    if origin is list:
        return "a list of " + describe(args[0], plural=True)
    if kind in _NAMES:
        return _NAMES[kind][plural]
    return kind.__name__
