"""Plain values (from YAML or the command line) checked against type annotations, for TrainConfig's fields.

The rules: bools are only true/false, ints are not bools (and widen to float), ``X | None`` accepts
null, lists and tuples check their items (a list becomes a tuple where the annotation says tuple),
mappings their keys and values. A value that does not fit is a ``Mismatch``; the caller turns it into
one ``ConfigError`` line naming the field, the value and where it came from, worded by ``describe_type``.
"""

from __future__ import annotations

import types
import typing
from typing import Any


class ConfigError(ValueError):
    """A bad config value, key or file: one line naming the field, the value and where it came from."""


class Mismatch(Exception):
    """``coerce``'s "does not fit": caught by the caller, who knows the field and where the value came from."""


def show_value(value: Any) -> str:
    """A value as an error line quotes it: its repr, cut at 60 characters."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def describe_type(t: Any) -> str:
    """How a type annotation reads in an error: 'an integer or null', 'a list of strings'."""
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin in (typing.Union, types.UnionType):
        parts = [describe_type(a) for a in args if a is not type(None)]
        return " or ".join(parts) + (" or null" if type(None) in args else "")
    if t is bool:
        return "true or false"
    if t is int:
        return "an integer"
    if t is float:
        return "a number"
    if t is str:
        return "a string"
    if t is type(None):
        return "null"
    if origin in (list, tuple) or t in (list, tuple):
        if args and (origin is list or args[-1] is Ellipsis):
            return f"a list of {describe_type(args[0]).removeprefix('an ').removeprefix('a ')}s"
        if args:
            return f"a list of {len(args)} values ({', '.join(describe_type(a) for a in args)})"
        return "a list"
    if origin is dict or t is dict:
        return "a mapping"
    return f"a {getattr(t, '__name__', t)}"


def coerce(value: Any, t: Any) -> Any:
    """value as type t (int -> float widening, list -> tuple), or Mismatch."""
    if t is Any:
        return value
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is not type(None):
                try:
                    return coerce(value, a)
                except Mismatch:
                    pass
        raise Mismatch
    if t is type(None):
        if value is None:
            return None
        raise Mismatch
    if t is bool:
        if isinstance(value, bool):
            return value
        raise Mismatch
    if t is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise Mismatch
    if t is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise Mismatch
    if t is str:
        if isinstance(value, str):
            return value
        raise Mismatch
    if origin in (list, tuple) or t in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise Mismatch
        if not args:
            items = list(value)
        elif origin is list or args[-1] is Ellipsis:
            items = [coerce(v, args[0]) for v in value]
        else:
            if len(value) != len(args):
                raise Mismatch
            items = [coerce(v, a) for v, a in zip(value, args)]
        return tuple(items) if (origin is tuple or t is tuple) else items
    if origin is dict or t is dict:
        if not isinstance(value, dict):
            raise Mismatch
        if len(args) == 2:
            return {coerce(k, args[0]): coerce(v, args[1]) for k, v in value.items()}
        return dict(value)
    if isinstance(t, type) and isinstance(value, t):
        return value
    raise Mismatch
