"""One registry per extension point: attention methods and attention patterns each have one.

A registry maps a name to an entry and refuses duplicates, so two files cannot silently claim one name.
"""

from __future__ import annotations

import difflib
from typing import Generic, Iterator, TypeVar

from .errors import PolicyError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T) -> T:
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._entries[name] = entry
        return entry

    def unregister(self, name: str) -> None:
        self._entries.pop(name, None)

    def get(self, name: str, *, field: str = "use") -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise PolicyError(unknown_name_message(field, name, self.names(), self.kind)) from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


def unknown_name_message(field: str, name: object, allowed: list[str], kind: str) -> str:
    message = f"{field}: unknown {kind} {name!r}; allowed: {', '.join(allowed)}"
    close = difflib.get_close_matches(str(name), allowed, n=1)
    if close:
        message += f" (did you mean {close[0]!r}?)"
    return message
