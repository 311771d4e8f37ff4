"""The stream-prefetch table of docs/scaling.md, written from two runs of ``benchmarks/throughput.py --streaming``
(``--stream-prefetch 0`` and ``2``), so that no figure is typed by hand.

    .venv/bin/python benchmarks/publish_prefetch.py benchmarks/results/throughput_stream_prefetch0.json \\
        benchmarks/results/throughput_stream_prefetch2.json --publish docs/scaling.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from onerank.benchmarking.report import publish_section


def table(runs: list[dict]) -> str:
    lines = ["| dataset | model | " + " | ".join(
        f"prefetch {r['stream_prefetch']}: samples/s, data share, busy" for r in runs) + " |",
             "|---|---|" + "---|" * len(runs)]
    keys = [(x["dataset"], x["model"]) for x in runs[0]["results"] if "error" not in x]
    for dataset, model in keys:
        cells = []
        for run in runs:
            row = next(x for x in run["results"] if (x["dataset"], x["model"]) == (dataset, model))
            cells.append(f"{row['train_samples_per_s']:,.0f}, {row['data_share']:.1%}, {row['busy']:.2f}")
        lines.append(f"| {dataset} | {model} | " + " | ".join(cells) + " |")
    loads = ", ".join(f"{r['load_average'][0]:.1f}" for r in runs)
    commits = ", ".join(f"`{(r.get('code') or {}).get('git_commit', '?')[:10]}`"
                        f"{' (uncommitted changes)' if (r.get('code') or {}).get('git_dirty') else ''}" for r in runs)
    lines += ["", f"(Commits: {commits}. Load average when each run started: {loads}, on a machine with 2 cores shared "
              "with other jobs; the data share is the wall time spent waiting for the next batch.)"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--publish", type=Path, required=True)
    args = parser.parse_args()
    runs = [json.loads(p.read_text()) for p in args.runs]
    publish_section(args.publish, "stream-prefetch", table(runs))


if __name__ == "__main__":
    main()
