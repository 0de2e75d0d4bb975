"""Typed access to a TOML table for the node's configuration and model-package manifests.

Each accessor checks the kind and range of one value and remembers the key, so :meth:`Table.done`
can reject keys nobody asked for.  Every error names the key (with its path, e.g.
``routes[0].priority``), the value, and what was expected.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any, Callable

_MISSING = object()

#: PS3.5 6.2: an AE title is 1-16 characters of the default repertoire, no backslash or control
#: characters; leading and trailing spaces are not significant.
_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")


class Table:
    def __init__(self, doc: Any, prefix: str, error: Callable[[str], Exception], unknown_hint: str = ""):
        self.doc, self.prefix, self.error, self.unknown_hint = doc, prefix, error, unknown_hint
        self.seen: set[str] = set()

    def _child(self, doc: Any, prefix: str) -> "Table":
        return Table(doc, prefix, self.error, self.unknown_hint)

    def has(self, key: str) -> bool:
        return key in self.doc

    def _get(self, key: str, default: Any, expected: str) -> Any:
        self.seen.add(key)
        if key in self.doc:
            return self.doc[key]
        if default is _MISSING:
            raise self.error(f"{self.prefix}{key} is required ({expected})")
        return default

    def _bad(self, key: str, value: Any, expected: str) -> Exception:
        return self.error(f"{self.prefix}{key} = {value!r}: expected {expected}")

    def table(self, key: str, default: Any = _MISSING) -> "Table":
        value = self._get(key, default, "a table")
        if not isinstance(value, dict):
            raise self._bad(key, value, f"a table [{self.prefix}{key}]")
        return self._child(value, f"{self.prefix}{key}.")

    def tables(self, key: str) -> list["Table"]:
        value = self._get(key, [], "an array of tables")
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise self._bad(key, value, f"an array of tables [[{self.prefix}{key}]]")
        return [self._child(v, f"{self.prefix}{key}[{i}].") for i, v in enumerate(value)]

    def string(self, key: str, default: Any = _MISSING) -> str:
        if key not in self.doc and default is not _MISSING:
            self.seen.add(key)
            return default  # defaults are the code's own; None means "not given"
        value = self._get(key, default, "a string")
        if not isinstance(value, str) or not value:
            raise self._bad(key, value, "a non-empty string")
        return value

    def strings(self, key: str, default: Any = _MISSING) -> list[str]:
        value = self._get(key, default, "a list of strings")
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise self._bad(key, value, "a list of non-empty strings")
        return value

    def choice(self, key: str, allowed: tuple[str, ...] | dict, default: Any = _MISSING) -> str:
        value = self._get(key, default, f"one of {', '.join(allowed)}")
        if value not in allowed:
            raise self._bad(key, value, f"one of {', '.join(allowed)}")
        return value

    def boolean(self, key: str, default: Any = _MISSING) -> bool:
        value = self._get(key, default, "true or false")
        if not isinstance(value, bool):
            raise self._bad(key, value, "true or false")
        return value

    def integer(self, key: str, default: Any = _MISSING, minimum: int | None = None) -> int:
        value = self._get(key, default, "an integer")
        if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
            raise self._bad(key, value, "an integer" + (f" >= {minimum}" if minimum is not None else ""))
        return value

    def number(self, key: str, default: Any = _MISSING, minimum: float | None = None,
               maximum: float | None = None, positive: bool = False) -> float:
        value = self._get(key, default, "a number")
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        ok = ok and (minimum is None or value >= minimum) and (maximum is None or value <= maximum)
        if not ok or (positive and value <= 0):
            bounds = [f">= {minimum}"] if minimum is not None else []
            bounds += [f"<= {maximum}"] if maximum is not None else []
            bounds += ["> 0"] if positive else []
            raise self._bad(key, value, "a number" + (" " + " and ".join(bounds) if bounds else ""))
        return float(value)

    def numbers(self, key: str, positive: bool = False) -> list[float]:
        value = self._get(key, _MISSING, "a list of numbers")
        if (not isinstance(value, list) or not value
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
                or (positive and not all(v > 0 for v in value))):
            raise self._bad(key, value, "a non-empty list of numbers" + (" > 0" if positive else ""))
        return [float(v) for v in value]

    def port(self, key: str, default: Any = _MISSING) -> int:
        value = self._get(key, default, "a TCP port")
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
            raise self._bad(key, value, "a TCP port number from 1 to 65535")
        return value

    def address(self, key: str, default: Any = _MISSING) -> str:
        value = self._get(key, default, "an IP address")
        try:
            ipaddress.ip_address(value)
        except (ValueError, TypeError):
            raise self._bad(key, value, "an IP address to listen on, e.g. \"0.0.0.0\" or \"127.0.0.1\"") from None
        return value

    def ae_title(self, key: str, default: Any = _MISSING) -> str:
        value = self._get(key, default, "an AE title")
        if not isinstance(value, str) or not _AE_RE.match(value) or not value.strip():
            raise self._bad(key, value, "an AE title: 1 to 16 characters, no backslash or control characters")
        return value.strip()

    def done(self) -> None:
        """Reject any key of this table that no accessor read."""
        for key in self.doc:
            if key not in self.seen:
                where = self.prefix.rstrip(".") or "the top level"
                raise self.error(f"unknown key {self.prefix}{key} in {where}{self.unknown_hint}")
