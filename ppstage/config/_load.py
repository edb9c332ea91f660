"""Loading a config: TOML text to nested data, nested data to typed sections, errors that name keys.

msgspec validates while converting; its messages (``Expected `float` > 0.0 -
at `$.runtime.pg_timeout_s```) are rewritten here as ``ConfigError`` lines a
user can act on (``runtime.pg_timeout_s: must be > 0, got -1``).
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from ppstage.errors import PPStageError

T = TypeVar("T")


class ConfigError(PPStageError, ValueError):
    """A config value is missing, malformed or inconsistent with another (names the key path)."""



def convert(data: dict[str, Any], cls: type[T]) -> T:
    """``data`` (TOML's nested shape) as ``cls``; raises ``ConfigError`` naming the key path."""
    try:
        return msgspec.convert(data, cls)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"invalid config: {_explain(exc, data)}") from exc
    except ConfigError as exc:
        raise ConfigError(f"invalid config: {exc}") from exc


def read_toml(path: str | Path) -> dict[str, Any]:
    """The nested data of a TOML file; raises ``ConfigError`` if it cannot be read or parsed."""
    try:
        return tomllib.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:  # (not UTF-8: found by fuzzing)
        raise ConfigError(f"cannot read config {path}: {exc}") from exc


_AT = re.compile(r"^(?P<what>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.S)
_BOUND = re.compile(r"^Expected `\w+` (?P<bound>[<>]=? \S+)$")


def _explain(exc: msgspec.ValidationError, data: Any) -> str:
    """msgspec's ``Expected `float` > 0.0 - at `$.runtime.pg_timeout_s``` as
    ``runtime.pg_timeout_s: must be > 0, got -1``; a ``__post_init__`` rule's
    own message (it names its keys) as is."""
    if isinstance(exc.__cause__, ConfigError):
        return str(exc.__cause__)
    m = _AT.match(str(exc))
    what, path = (m["what"], m["path"]) if m else (str(exc), None)
    key = (path or "").lstrip(".")
    if what.startswith("Object contains unknown field"):
        field = what.rsplit(" ", 1)[-1]
        return f"{key}: unknown key {field}" if key else f"unknown section or key {field}"
    bound = _BOUND.match(what)
    if bound is not None:
        limit = re.sub(r"(\d)\.0$", r"\1", bound["bound"])
        return f"{key}: must be {limit}, got {_lookup(data, key)!r}"
    text = what[:1].lower() + what[1:]
    return f"{key}: {text}" if key else text


def _lookup(data: Any, path: str) -> Any:
    """The value at a msgspec path such as ``runtime.d_in`` or ``topology.layer_ranges[1][0]``."""
    for part in re.findall(r"[^.\[\]]+|\[\d+\]", path):
        try:
            data = data[int(part[1:-1])] if part.startswith("[") else data[part]
        except (KeyError, IndexError, TypeError, ValueError):
            return "?"
    return data
