"""Write the generated advertising funnel log that the ``heroes_funnel`` suite reads with the tabular loader.

    PYTHONPATH=src .venv/bin/python benchmarks/heroes_funnel_data.py ../runs/heroes-funnel

The log is ``tests/funnel_log.py``'s (the generator of the funnel tests and of ``benchmarks/funnel_fixes.py``, seed 0,
its default size: 900 users, 300 ads, about 36,000 impressions in requests of 8 slots over 14 days); the schema keeps
the click -> conversion funnel (conversion in click space) without the dwell task. Files: ``ads.csv``,
``events.csv`` and ``funnel.yaml`` in the folder given (created; existing files of the same names are replaced only
when their content differs, so the cache key, which holds their size and time, stays put on a re-run).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from funnel_log import funnel_log  # noqa: E402  (tests/ holds the generator the tests share)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    args = parser.parse_args(argv)
    args.folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        funnel_log().write(tmp, dwell=False)
        for made in sorted(Path(tmp).iterdir()):
            target = args.folder / made.name
            if not target.exists() or target.read_bytes() != made.read_bytes():
                target.write_bytes(made.read_bytes())
            print(target)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
