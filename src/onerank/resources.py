"""What ships with onerank: the run configs (``configs/``) and the benchmark suites (``benchmarks/suites/``), and the
plug-ins it knows by name (``Registry``: datasets, models, weightings, objective terms), and the check for an optional
dependency (``require``: a missing extra is named in one line).

In a checkout (or an editable install) the folders are the repository's; an installed wheel carries copies inside the
package (``onerank/configs``, ``onerank/suites``, see setup.py).
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import Generic, TypeVar

T = TypeVar("T")

PACKAGE = Path(__file__).resolve().parent
CHECKOUT = {"configs": PACKAGE.parents[1] / "configs", "suites": PACKAGE.parents[1] / "benchmarks" / "suites"}


def shipped(name: str) -> Path:
    """The folder of shipped ``configs`` or ``suites``: the packaged copy, else the checkout's."""
    if name not in CHECKOUT:
        raise ValueError(f"unknown resource {name!r}; expected one of {sorted(CHECKOUT)}")
    packaged = PACKAGE / name
    return packaged if packaged.is_dir() else CHECKOUT[name]


class Registry(Generic[T]):
    """Names -> plug-ins, as a module map: each entry is ``"module:attribute"``, imported when the name is first asked
    for. Listing the names imports nothing, and no module registers itself by being imported (the map is the one place
    that says what exists). ``register`` adds a user's plug-in: the object itself or its ``"module:attribute"``."""

    def __init__(self, kind: str, entries: dict[str, str], error: type[Exception] = KeyError) -> None:
        self.kind = kind
        self._entries: dict[str, T | str] = dict(entries)
        self._error = error

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def register(self, name: str, target: T | str) -> None:
        self._entries[name] = target

    def get(self, name: str) -> T:
        if name not in self._entries:
            raise self._error(f"unknown {self.kind} {name!r}; available: {', '.join(self.names())}")
        target = self._entries[name]
        if isinstance(target, str):
            module, _, attribute = target.partition(":")
            target = self._entries[name] = getattr(importlib.import_module(module), attribute)
        return target


# ---------------------------------------------------------------------------------------------------------------------
# Optional dependencies: the extras of pyproject.toml
# ---------------------------------------------------------------------------------------------------------------------
class MissingExtra(RuntimeError):
    """A command needs an optional dependency that is not installed; the message names the extra that brings it."""


def require(extra: str, what: str, *modules: str) -> None:
    """Raise ``MissingExtra`` naming ``onerank[extra]`` when any of ``modules`` (import names) is not installed.
    Looks the modules up without importing them, so the check costs nothing where they are present."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingExtra(f"{what} needs the optional dependencies of onerank[{extra}] ({', '.join(missing)} not "
                           f"installed): pip install 'onerank[{extra}]'")
