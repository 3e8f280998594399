"""Merge bench.throughput's JSONs of one machine run with each LoRA backend (bench/device_check.sh):

    python -m bench.throughput_merge OUT torch=RUN1.json triton=RUN2.json

OUT holds every run under `backends` and, per scenario, the decode tok/s of each backend over the
first one's (`triton/torch`). A run given as its printed log instead (NAME=RUN.log: one cut off by
its timeout writes no JSON) contributes the figures it printed."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from bench.common import write_json

# bench.throughput's line per scenario: "   hetero1: decode   579.0 tok/s   end-to-end   559.4 tok/s"
SCENARIO_LINE = re.compile(r"^\s*(\w+): decode\s+([\d.]+) tok/s\s+end-to-end\s+([\d.]+) tok/s$", re.MULTILINE)


def read_run(path: Path) -> dict:
    if path.suffix != ".log":
        return json.loads(path.read_text())
    run: dict = {"e2e_tok_s": {}, "source": f"printed figures of {path.name} (the run wrote no JSON)"}
    for key, decode, e2e in SCENARIO_LINE.findall(path.read_text()):
        run[f"{key}_tok_s"], run["e2e_tok_s"][key] = float(decode), float(e2e)
    return run


def merge(runs: dict[str, dict]) -> dict:
    names = list(runs)
    first = runs[names[0]]
    ratios = {}
    for other in names[1:]:
        ratios[f"{other}/{names[0]}"] = {
            key.removesuffix("_tok_s"): round(runs[other][key] / value, 3)
            for key, value in first.items()
            if key.endswith("_tok_s") and isinstance(value, (int, float)) and value and key in runs[other]
        }
    return {**ratios, "backends": runs}


def main(argv: list[str]) -> int:
    if len(argv) < 2 or not all("=" in a for a in argv[1:]):
        print(__doc__, file=sys.stderr)
        return 2
    runs = {}
    for arg in argv[1:]:
        name, path = arg.split("=", 1)
        if Path(path).exists():  # a run that failed leaves no file: merge what there is
            runs[name] = read_run(Path(path))
    if not runs:
        print("no run to merge", file=sys.stderr)
        return 1
    merged = merge(runs)
    write_json(argv[0], merged)
    print(json.dumps({k: v for k, v in merged.items() if k != "backends"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
