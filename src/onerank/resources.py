"""Files shipped with onerank: the run configs (``configs/``) and the benchmark suites (``benchmarks/suites/``).

In a checkout (or an editable install) they are the repository's folders; an installed wheel carries copies inside the
package (``onerank/configs``, ``onerank/suites``, see setup.py).
"""

from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
CHECKOUT = {"configs": PACKAGE.parents[1] / "configs", "suites": PACKAGE.parents[1] / "benchmarks" / "suites"}


def shipped(name: str) -> Path:
    """The folder of shipped ``configs`` or ``suites``: the packaged copy, else the checkout's."""
    if name not in CHECKOUT:
        raise ValueError(f"unknown resource {name!r}; expected one of {sorted(CHECKOUT)}")
    packaged = PACKAGE / name
    return packaged if packaged.is_dir() else CHECKOUT[name]


# ---------------------------------------------------------------------------------------------------------------------
# Optional dependencies: the extras of pyproject.toml
# ---------------------------------------------------------------------------------------------------------------------
class MissingExtra(RuntimeError):
    """A command needs an optional dependency that is not installed; the message names the extra that brings it."""


def require(extra: str, what: str, *modules: str) -> None:
    """Raise ``MissingExtra`` naming ``onerank[extra]`` when any of ``modules`` (import names) is not installed.
    Looks the modules up without importing them, so the check costs nothing where they are present."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingExtra(f"{what} needs the optional dependencies of onerank[{extra}] ({', '.join(missing)} not "
                           f"installed): pip install 'onerank[{extra}]'")
