"""Merge bench.throughput's JSONs of one machine run with each LoRA backend (bench/device_check.sh):

    python -m bench.throughput_merge OUT torch=RUN1.json triton=RUN2.json

OUT holds every run under `backends` and, per scenario, the decode tok/s of each backend over the
first one's (`triton/torch`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from bench.common import write_json


def merge(runs: dict[str, dict]) -> dict:
    names = list(runs)
    first = runs[names[0]]
    ratios = {}
    for other in names[1:]:
        ratios[f"{other}/{names[0]}"] = {
            key.removesuffix("_tok_s"): round(runs[other][key] / value, 3) for key, value in first.items()
            if key.endswith("_tok_s") and isinstance(value, (int, float)) and value and key in runs[other]}
    return {**ratios, "backends": runs}


def main(argv: list[str]) -> int:
    if len(argv) < 2 or not all("=" in a for a in argv[1:]):
        print(__doc__, file=sys.stderr)
        return 2
    runs = {}
    for arg in argv[1:]:
        name, path = arg.split("=", 1)
        if Path(path).exists():  # a run that failed leaves no file: merge what there is
            runs[name] = json.loads(Path(path).read_text())
    if not runs:
        print("no run to merge", file=sys.stderr)
        return 1
    merged = merge(runs)
    write_json(argv[0], merged)
    print(json.dumps({k: v for k, v in merged.items() if k != "backends"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
