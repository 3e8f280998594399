"""How well the base model's own hidden states name a prompt's task, next to retrieval's top-1.

A linear probe (multinomial logistic regression) reads the hidden state of the last prompt token,
the one that predicts the first answer token, at several layers. It is fit on train-split prompts
(the phrasings the cards and the gate are trained on) and scored on the eval split, whose phrasings
are held out: the same prompts `mole-serve eval` uses. Retrieval's top-1 on those prompts is the
baseline in the same process. The probe bounds what a router reading one layer's hidden state
could tell apart; it is a diagnostic, not a serving path.

    python -m bench.task_probe --out bench/results/task_probe.json
"""

from __future__ import annotations

import argparse

import torch
from mole_serve.compose import store_retriever
from mole_serve.config import Settings
from mole_serve.engine.loader import resolve_base_model
from mole_serve.training.tasks import TASKS, task_library
from mole_serve.training.train_adapter import build_chat
from transformers import AutoModelForCausalLM, AutoTokenizer

from bench.common import machine, write_json


@torch.no_grad()
def last_token_states(model, tok, prompts: list[str], layers: list[int]) -> torch.Tensor:
    """[len(layers), n, d]: each prompt's last-token hidden state (chat-templated, generation prompt on)."""
    out = []
    for prompt in prompts:
        ids = tok.apply_chat_template(build_chat(prompt), add_generation_prompt=True, tokenize=True, return_dict=True)[
            "input_ids"
        ]
        states = model(torch.tensor([ids]), output_hidden_states=True).hidden_states
        out.append(torch.stack([states[layer][0, -1] for layer in layers]))
    return torch.stack(out, dim=1)


def fit_probe(x: torch.Tensor, y: torch.Tensor, classes: int, weight_decay: float = 1e-3):
    """Logistic regression on standardized features by L-BFGS; returns predict(x) -> labels."""
    mean, std = x.mean(0), x.std(0) + 1e-6
    linear = torch.nn.Linear(x.shape[1], classes)
    optim = torch.optim.LBFGS(linear.parameters(), max_iter=300, line_search_fn="strong_wolfe")
    xs = (x - mean) / std

    def closure():
        optim.zero_grad()
        loss = torch.nn.functional.cross_entropy(linear(xs), y) + weight_decay * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    optim.step(closure)
    return lambda z: linear((z - mean) / std).argmax(-1)


def per_task(hits: torch.Tensor, labels: torch.Tensor, tasks: list[str]) -> dict:
    scores = {t: round(hits[labels == i].float().mean().item(), 3) for i, t in enumerate(tasks)}
    return {"mean": round(sum(scores.values()) / len(scores), 3), "per_task": scores}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-per-task", type=int, default=40)
    ap.add_argument("--eval-per-task", type=int, default=50)
    ap.add_argument(
        "--layers",
        type=int,
        nargs="+",
        default=[10, 20, 25, 29, 30],
        help="hidden_states indices: 0 is the embeddings, the last is after the final norm",
    )
    ap.add_argument("--out", default="bench/results/task_probe.json")
    args = ap.parse_args(argv)

    settings = Settings()
    library = task_library(settings.adapters_dir)
    tasks = sorted(library)
    path = resolve_base_model(settings)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    def split(name: str, n: int) -> tuple[list[str], torch.Tensor]:
        prompts = [(p, i) for i, t in enumerate(tasks) for p, _ in TASKS[t].examples(name, n, seed=0)]
        return [p for p, _ in prompts], torch.tensor([i for _, i in prompts])

    train_prompts, y_train = split("train", args.train_per_task)
    eval_prompts, y_eval = split("eval", args.eval_per_task)
    x_train = last_token_states(model, tok, train_prompts, args.layers)
    x_eval = last_token_states(model, tok, eval_prompts, args.layers)

    hits = store_retriever(settings).search(eval_prompts, 1)
    own = torch.tensor([bool(h) and h[0][0] == library[tasks[i]] for h, i in zip(hits, y_eval.tolist())])
    retrieval = per_task(own, y_eval, tasks)
    probes = {}
    for j, layer in enumerate(args.layers):
        predict = fit_probe(x_train[j], y_train, len(tasks))
        probes[layer] = per_task(predict(x_eval[j]) == y_eval, y_eval, tasks)

    print(f"held-out phrasings, {args.eval_per_task} per task; probe fit on {args.train_per_task} train prompts a task")
    print(f"{'task':18s} {'retrieval':>9s} " + " ".join(f"{'L' + str(layer):>6s}" for layer in args.layers))
    for t in tasks:
        print(
            f"{t:18s} {retrieval['per_task'][t]:9.2f} "
            + " ".join(f"{probes[la]['per_task'][t]:6.2f}" for la in args.layers)
        )
    print(f"{'mean':18s} {retrieval['mean']:9.3f} " + " ".join(f"{probes[la]['mean']:6.3f}" for la in args.layers))
    best = max(args.layers, key=lambda la: probes[la]["mean"])
    ratio = round(probes[best]["mean"] / retrieval["mean"], 3)
    print(f"best probe (hidden_states[{best}]) / retrieval top-1: {ratio}")
    write_json(
        args.out,
        {
            "machine": machine(),
            "train_per_task": args.train_per_task,
            "eval_per_task": args.eval_per_task,
            "retrieval_top1": retrieval,
            "probe_by_layer": probes,
            "best_layer": best,
            "best_probe_over_retrieval": ratio,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
