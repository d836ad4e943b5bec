"""YAML as the run's config files are read and written: YAML 1.2's scalars, whatever PyYAML's 1.1 says.

Only true/false are booleans (``no``, ``on``, ``yes`` stay strings) and ``1e-4`` is a number
(``StrictLoader``); ``StrictDumper`` quotes every string that either reading would take for a bool or a
number, so a written config.yaml reads back identically with this loader and with a YAML 1.1 one.
"""

from __future__ import annotations

import re

import yaml

from trainer.typecheck import ConfigError


class StrictLoader(yaml.SafeLoader):
    """YAML 1.2's scalars: only true/false are booleans (not yes/no/on/off), and 1e-4 is a float."""


StrictLoader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:float")]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
StrictLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                   list("tTfF"))
StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9][0-9_]*(?:\.[0-9_]*)?)(?:[eE][-+]?[0-9]+)?"
               r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))


class StrictDumper(yaml.SafeDumper):
    """Quotes every string that either YAML 1.1 or StrictLoader would read as a bool or a number."""


for _first, _resolvers in StrictLoader.yaml_implicit_resolvers.items():
    for _tag, _rx in _resolvers:
        if _tag in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:float"):
            StrictDumper.add_implicit_resolver(_tag, _rx, [_first])


def read_yaml(path: str) -> dict:
    """A YAML mapping, read strictly (StrictLoader); ConfigError naming the file otherwise."""
    try:
        with open(path) as fh:
            doc = yaml.load(fh, Loader=StrictLoader)
    except FileNotFoundError:
        raise ConfigError(f"--config {path}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"--config {path}: cannot read it ({exc.strerror or exc})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML{at}: {problem}") from None
    doc = {} if doc is None else doc
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: expected a mapping of TrainConfig fields, not {type(doc).__name__}")
    return doc
