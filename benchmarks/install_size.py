"""Installed size of onerank's default install and of each extra, for a pyproject.toml (this one or another
revision's), measured in an environment that holds every distribution involved (the dev venv).

For an install (``default``, or an extra), the closure of its requirements over the distributions' own metadata
(``importlib.metadata``: requirements, with their markers and extras) is what pip would install; each distribution's
size is the sum of the file sizes in its RECORD (the bytes pip wrote). Printed and written as JSON, with and without
torch (which a user usually has already).

    python benchmarks/install_size.py                                  # this checkout's pyproject.toml
    python benchmarks/install_size.py --pyproject OTHER/pyproject.toml --label before --out results.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


class NotInstalled(LookupError):
    """A distribution of the closure is not in this environment (e.g. the CUDA build of FBGEMM on a CPU machine)."""


def closure(requirements: list[str]) -> dict[str, metadata.Distribution]:
    """Distribution name -> distribution, for every distribution the requirements pull in (recursively)."""
    found: dict[str, metadata.Distribution] = {}
    done: set[tuple[str, tuple[str, ...]]] = set()
    todo = [Requirement(r) for r in requirements]
    while todo:
        requirement = todo.pop()
        name = canonicalize_name(requirement.name)
        key = (name, tuple(sorted(requirement.extras)))
        if key in done:
            continue
        done.add(key)
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            raise NotInstalled(name) from None
        found[name] = dist
        environments = [{"extra": e} for e in requirement.extras] or [{"extra": ""}]
        for text in dist.requires or []:
            sub = Requirement(text)
            if sub.marker is None or any(sub.marker.evaluate(env) for env in environments):
                todo.append(sub)
    return found


def requirements(project: dict, install: str) -> list[str]:
    """The requirements of ``install`` (default, or an extra), with onerank's own extras expanded."""
    extras = project.get("optional-dependencies", {})

    def expand(items: list[str]) -> list[str]:
        out = []
        for text in items:
            requirement = Requirement(text)
            if canonicalize_name(requirement.name) == "onerank":
                out += [r for extra in sorted(requirement.extras) for r in expand(extras[extra])]
            else:
                out.append(text)
        return out

    return list(project["dependencies"]) + ([] if install == "default" else expand(extras[install]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pyproject", default=str(ROOT / "pyproject.toml"))
    parser.add_argument("--label", default="this checkout")
    parser.add_argument("--out", help="append the rows to this JSON file")
    args = parser.parse_args()
    project = tomllib.loads(Path(args.pyproject).read_text())["project"]
    installs = ["default", *project.get("optional-dependencies", {})]
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    # clean: no change in the checkout but the results file itself
    ignore = [f":!{Path(args.out).resolve().relative_to(ROOT)}"] if args.out and Path(args.out).resolve().is_relative_to(
        ROOT) else []
    clean = not subprocess.run(["git", "status", "--porcelain", "--", ".", *ignore], cwd=ROOT, capture_output=True,
                               text=True).stdout
    rows = []
    for install in installs:
        try:
            dists = closure(requirements(project, install))
        except NotInstalled as exc:  # an extra this environment cannot hold is left out, and said so
            print(f"{args.label:>14}  {install:<9} not measured: {exc} is not installed here")
            rows.append({"label": args.label, "commit": commit, "clean": clean, "install": install,
                         "not_measured": f"{exc} is not installed in the measuring environment"})
            continue
        sizes = {name: sum(f.size or 0 for f in dist.files or []) for name, dist in dists.items()}
        total, torch = sum(sizes.values()), sizes.get("torch", 0)
        rows.append({
            "label": args.label, "commit": commit, "clean": clean, "install": install, "distributions": len(dists), "torch": dists["torch"].version,
            "mb_total": round(total / 1e6, 1), "mb_without_torch": round((total - torch) / 1e6, 1),
            "largest_without_torch": sorted(((round(v / 1e6, 1), k) for k, v in sizes.items() if k != "torch"),
                                            reverse=True)[:6],
        })
        print(f"{args.label:>14}  {install:<9} {len(dists):3d} distributions  {total / 1e6:7.1f} MB, "
              f"without torch {(total - torch) / 1e6:6.1f} MB")
    if args.out:
        path = Path(args.out)
        previous = json.loads(path.read_text())["rows"] if path.exists() else []
        keep = [r for r in previous if r["label"] != args.label]
        path.write_text(json.dumps({"python": sys.version.split()[0],
                                    "method": "closure of requirements over installed metadata, RECORD file sizes",
                                    "rows": keep + rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
