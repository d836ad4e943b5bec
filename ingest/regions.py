"""Turn whatever a file says about location into a region name and a safe path component.

Real files carry bytes, compound strings (``brain_region: ALM; cortical_layer: 5``)
and placeholders (``''``, ``'unknown'``, ``'brain area'``); all of these must end
up as a region name that can sit in a shard path.
"""

from __future__ import annotations

import re

UNKNOWN = "unknown"
PLACEHOLDERS = {"", "none", "null", "nan", "n/a", "na", "unknown", "brain area", "brain_area", "undefined", "unspecified"}
_COMPOUND_KEYS = ("brain_region", "brain_area", "region", "area", "location", "structure")
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def decode(value: object) -> str:
    """Bytes or numpy scalars to a stripped str."""
    if isinstance(value, (bytes, bytearray)):
        value = value.decode("utf-8", errors="replace")
    if hasattr(value, "item") and not isinstance(value, str):
        value = value.item()  # type: ignore[union-attr]
        if isinstance(value, bytes):
            value = value.decode("utf-8", errors="replace")
    return str(value).strip()


def parse_region(value: object) -> str | None:
    """The region named by a location value, or None when it names none."""
    text = decode(value)
    if ":" in text and ";" in text or text.lower().startswith(_COMPOUND_KEYS):
        fields = {}
        for part in text.split(";"):
            if ":" in part:
                k, v = part.split(":", 1)
                fields[k.strip().lower()] = v.strip()
        for key in _COMPOUND_KEYS:
            if key in fields and fields[key].lower() not in PLACEHOLDERS:
                return fields[key]
        return None
    if text.lower() in PLACEHOLDERS:
        return None
    return text


def safe_component(text: str) -> str:
    """A path component with only [A-Za-z0-9_-]; never empty, never '.' or '..'."""
    out = _UNSAFE.sub("-", decode(text)).strip("-")
    return out or UNKNOWN


def region_name(value: object) -> str:
    """Safe region name, ``unknown`` for placeholders."""
    parsed = parse_region(value)
    return safe_component(parsed) if parsed else UNKNOWN
