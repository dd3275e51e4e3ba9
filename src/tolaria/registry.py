"""Config strings that name a built-in, or the user's own code as ``module:attr``.

Datasets, hosts, blueprints and policies are each chosen by a string in the configuration.
One ``Registry`` per kind gives them the same lookup rule (a registered name, else a
``module:attr`` reference) and the same one-line ``ConfigError`` for a name that is
neither, listing what would have worked.
"""

from __future__ import annotations

from typing import Generic, TypeVar, cast

from tolaria.errors import ConfigError
from tolaria.plugins import is_reference, resolve_callable

T = TypeVar("T")


class Registry(Generic[T]):
    """Entries of one ``kind`` by name, chosen by the config field ``field``."""

    def __init__(self, kind: str, field: str) -> None:
        self.kind = kind
        self.field = field
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T, *, replace: bool = False) -> T:
        """Make ``entry`` available as ``name`` and return it; a taken name needs ``replace``."""
        if name in self._entries and not replace:
            raise ValueError(
                f"{self.kind} {name!r} is already registered (pass replace=True to override)"
            )
        self._entries[name] = entry
        return entry

    def unregister(self, name: str) -> None:
        """Forget ``name``; an unknown name is no error, so teardown code need not check."""
        self._entries.pop(name, None)

    def names(self) -> list[str]:
        """Registered names in registration order (the order error messages list them in)."""
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        # Registered names only: a reference is resolvable, not registered.
        return isinstance(name, str) and name in self._entries

    def get(self, name: str) -> T:
        """The entry registered as ``name``, or the object a ``module:attr`` name points to."""
        if name in self._entries:
            return self._entries[name]
        if is_reference(name):
            # resolve_callable promises only a callable: callers check what calling it returns.
            return cast(T, resolve_callable(name, self.field))
        raise ConfigError(
            f"{self.field}={name!r}: unknown {self.kind} (built-in: {', '.join(self.names())}; "
            "or 'module:function' for your own)"
        )
