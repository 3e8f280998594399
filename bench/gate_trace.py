"""Where a gate sends each generated token: the weight of each adapter and of the base column per
token (mean over the layers), for one composite prompt with both skills named (`pair_gate`), and the
gate's training curve, as one image and its JSON.

    python -m bench.gate_trace --gate DIR --task datetime_to_text --out bench/results/gate_fusion_trace.png

The answer is generated greedily with the gate, then read again in one forward with the gate's
per-layer weights kept (the same tokens, so the same weights as during generation).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from mole_serve.compose import build
from mole_serve.config import Settings
from mole_serve.engine.request import SamplingParams
from mole_serve.routing.types import AdapterRef, Selection
from mole_serve.training.evaluate import chat_prompts, eval_set

from bench.common import write_json


def token_weights(engine, prompt: list[int], names: list[str], max_tokens: int) -> tuple[list[int], torch.Tensor]:
    """(generated ids, [tokens, adapters + 1] mean weight over layers of each adapter, then the base column)."""
    sel = Selection("gate", tuple(AdapterRef(n) for n in names))  # evaluate's pair_gate
    seq = engine.generate([prompt], SamplingParams(max_tokens=max_tokens), selections=[sel])[0]
    ids = prompt + seq.output_ids
    rows = torch.arange(len(prompt) - 1, len(ids) - 1)  # the rows that predicted each generated token
    out = engine.runner.prefill(
        [ids], [(names, [1 / len(names)] * len(names))], rows, engine.pool.gate, keep_layer_weights=True
    )
    stats = out.gate_stats
    per_layer = torch.stack(stats.layer_weights)[:, rows]  # [layers, tokens, U + 1]
    columns = [*stats.seq_columns[0], per_layer.shape[-1] - 1]
    return seq.output_ids, per_layer[..., columns].mean(0)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gate", type=Path, required=True, help="a gate folder (with its training_log.json)")
    ap.add_argument("--task", default="datetime_to_text", help="a composite task")
    ap.add_argument("--index", type=int, default=0, help="which of its held-out prompts")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--out", type=Path, default=Path("bench/results/gate_fusion_trace.png"))
    args = ap.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from mole_serve.training.tasks import COMPOSITES

    built = build(Settings())
    engine = built.engine
    built.load_gate(args.gate)
    item = eval_set([args.task], args.index + 1)[args.index]
    names = list(COMPOSITES[args.task].skills)
    prompt = chat_prompts(engine.tokenizer, [item])[0]
    with torch.inference_mode():
        ids, weights = token_weights(engine, prompt, names, args.max_tokens)
    tokens = [engine.tokenizer.decode([t]) for t in ids]
    log = json.loads((args.gate / "training_log.json").read_text())["steps"]

    fig, (curve, trace) = plt.subplots(2, 1, figsize=(11, 7))
    steps = [s["step"] for s in log]
    for key in ("lm", "route"):
        curve.plot(steps, [s[key] for s in log], label=f"{key} loss", linewidth=0.8)
    curve.set_xlabel("training step")
    curve.set_title(f"train-gate: {args.gate.name}")
    curve.legend()
    for j, label in enumerate([*names, "base (no adapter)"]):
        trace.plot(weights[:, j].tolist(), marker="o", markersize=3, label=label)
    trace.set_xticks(range(len(tokens)), [repr(t)[1:-1] for t in tokens], rotation=70, fontsize=7)
    trace.set_ylabel("weight (mean over layers)")
    trace.set_title(f"{args.task}: {item.prompt!r}", fontsize=9)
    trace.legend()
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    result = {
        "gate": str(args.gate),
        "task": args.task,
        "prompt": item.prompt,
        "expected": item.answer,
        "answer": engine.tokenizer.decode(ids, skip_special_tokens=True),
        "columns": [*names, "base"],
        "tokens": tokens,
        "weights": [[round(w, 4) for w in row] for row in weights.tolist()],
    }
    write_json(args.out.with_suffix(".json"), result)
    print(json.dumps({k: v for k, v in result.items() if k != "weights"}, indent=1))
    return result


if __name__ == "__main__":
    main()
