"""Train the per-layer MoLE router on the adapter library (`mole-serve train-gate`).

Base model and LoRAs stay frozen; only the gate's Ar/Br per layer learn. The forward is the
serving engine's own (DecoderModel + pool stacks + the rank-space gate in ops.py) with autograd
on, so the gate is trained on exactly the math that serves it. Each example's candidates are
its retrieved top-k with the true adapter forced in, then random LoRA dropout (drop some
distractors, or swap in random adapters) so the gate learns to score sets it never saw; half
the examples come with a uniform prior so the router learns to choose without retrieval's, and
the others with a flattened one. Loss = LM loss on the answer + balance_weight x MoLE's balance
loss + route_weight x a supervised routing loss (the true adapter of each example is known),
on the tokens that predict the answer.

`--composite-per-task N` fine-tunes a trained gate (`--init`, default the store's) on N examples of
each composite task (LoRA-Flow's few-shot setting: the library adapters stay frozen), whose answers
need two adapters: both are forced into the candidates and the routing loss rewards their summed
weight; with `--part-routing`, a sequential composite's answer tokens reward their own part's
adapter instead (the first skill's up to the separator ", ", the second's after it, either on the
separator), so the router learns where to switch; `--replay` of the examples are the library's
single tasks, so the single-task routing is not forgotten. `--out` names the folder (default: the
store's gate/).
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from mole_serve.config import Settings
from mole_serve.input_forms import SPELLED, set_input_form
from mole_serve.library.artifacts import save_gate as write_gate
from mole_serve.library.store import GATE_DIR, replace_folder
from mole_serve.lora.gate import EXTRA_COLUMNS, GateConfig, MoLEGate, balance_loss
from mole_serve.routing.selection import softmax
from mole_serve.training.options import options_parser, parse_options
from mole_serve.training.tasks import COMPOSITES, TASKS, task_library
from mole_serve.training.train_adapter import answer_token_ids, encode


@dataclass
class GateTrainOptions:
    steps: int = 800
    batch: int = 6
    lr: float = 1e-2
    rank: int = 16
    temperature: float = 1.0
    top_k: int = 3
    dropout: float = 0.3  # chance to drop each retrieved distractor
    random_sets: float = 0.3  # chance an example's distractors are random adapters instead
    # chance an example's prior is uniform, as for `adapters` named without weights: the router
    # must then tell the candidates apart on its own, not only sharpen retrieval's ranking
    uniform_priors: float = 0.5
    # the other examples' priors use a retrieval temperature drawn log-uniformly between the
    # server's (mixture_temperature) and this: flatter priors, as held-out phrasings get, on which
    # mixing in the distractors costs LM loss, so the gate learns to sharpen them
    prior_temperature_max: float = 1.0
    balance_weight: float = 0.5
    # Supervised routing: + route_weight x the mean of -log(gate weight of the example's true
    # adapter) over every layer and answer-predicting token. The LM and balance losses alone leave
    # the router near chance on uniform-prior examples (docs/decisions.md).
    route_weight: float = 1.0
    seed: int = 0
    composite_per_task: int = 0  # > 0: few-shot fine-tuning on the composite tasks (see the docstring)
    replay: float = 0.5  # few-shot: share of the examples drawn from the library's single tasks
    init: str = ""  # few-shot: the gate folder to start from (default: the store's gate/)
    part_routing: bool = False  # few-shot: route a sequential composite's tokens to their own part's adapter
    # LoRA-Flow's fusion form (lora/gate.py GateConfig.fusion): a base column and a bias per prior rank,
    # added to the --init router; with --part-routing the separator's tokens reward the base column
    fusion: bool = False
    # part routing: the LM loss weight of the tokens at a part boundary (the separator), against 1 for
    # every other answer token. The separator is one token in a dozen, yet whether it comes before the
    # end token decides whether the second part is written at all.
    boundary_weight: float = 1.0
    # fusion: the bias scaled by the token's base-column share (GateConfig.bias_by_base)
    bias_by_base: bool = False


BASE_COLUMN = ""  # in an example's token_true: the gate's base column (no adapter's name is empty)


@dataclass
class Example:
    ids: list[int]  # chat-templated prompt + answer + end token
    num_prompt: int
    candidates: list[str]
    priors: list[float]  # softmax(cosine / a jittered temperature) over the candidates, or uniform
    true: tuple[str, ...]  # the adapters the answer needs: one, or a composite task's two
    # per answer token (end token included), the adapters its routing rewards; None: `true` for all
    token_true: list[tuple[str, ...]] | None = None


# (prompt, answer, true adapters, characters of the answer's first part: a sequential composite's
# under part routing, else None)
Pair = tuple[str, str, tuple[str, ...], int | None]


def candidate_sets(
    trues: list[tuple[str, ...]],
    names: list[str],
    retrieved: list[list[str]],
    opts: GateTrainOptions,
    rng: random.Random,
) -> list[list[str]]:
    """Per example: its true adapters plus distractors up to top_k (at least 2 candidates), shuffled."""
    sets = []
    for true, hits in zip(trues, retrieved):
        room = max(opts.top_k - len(true), 0)
        others = [n for n in hits if n not in true][:room]
        if rng.random() < opts.random_sets:
            others = rng.sample([n for n in names if n not in true], room)
        kept = [n for n in others if rng.random() >= opts.dropout]
        if len(true) + len(kept) < 2:
            kept = others[:1]
        cands = [*true, *kept]
        rng.shuffle(cands)
        sets.append(cands)
    return sets


def answer_rows(examples: list[Example], boundary_weight: float = 1.0) -> tuple[list[int], list[int], list[float]]:
    """(rows of the flattened batch that predict answer tokens, those tokens, their LM loss weights:
    boundary_weight where the token is at a part boundary, else 1)."""
    rows, targets, weights, offset = [], [], [], 0
    for ex in examples:
        rows += range(offset + ex.num_prompt - 1, offset + len(ex.ids) - 1)
        targets += ex.ids[ex.num_prompt :]
        # part_adapters labels a boundary token with the base column or both adapters
        at_boundary = [t == (BASE_COLUMN,) or len(t) > 1 for t in ex.token_true or []]
        weights += [boundary_weight if b else 1.0 for b in at_boundary] or [1.0] * (len(ex.ids) - ex.num_prompt)
        offset += len(ex.ids)
    return rows, targets, weights


class UsageTracker:
    """MoLE's balance loss: q_i is LoRA i's share of all gate weight, summed over every example
    (0 where i was not a candidate), so a router that sends each task to its own adapter is
    balanced on a library of evenly sampled tasks, and one that favours some adapter is not.
    (Averaging only over i's candidacies would instead reward a uniform mixture: an adapter that is
    often a distractor would look starved by a sharp router.) A batch of 6 prompts over a library
    of 12 is too few for q, so q adds a decayed history (no gradient) to the batch's own sums."""

    def __init__(self, decay: float = 0.95) -> None:
        self.decay = decay
        self.weight: dict[str, float] = {}  # decayed sum of mean gate weights per adapter

    def balance(self, batch: dict[str, list[torch.Tensor]]) -> torch.Tensor:
        sums = {n: torch.stack(means).sum() for n, means in batch.items()}
        names = sorted(set(self.weight) | set(sums))
        q = torch.stack([self.weight.get(n, 0.0) + sums.get(n, torch.tensor(0.0)) for n in names])
        for n, total in zip(names, q.tolist()):
            self.weight[n] = self.decay * total
        return balance_loss(q)


def step_losses(
    engine, gate: MoLEGate, examples: list[Example], usage: UsageTracker, boundary_weight: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """(LM loss, balance loss, routing loss, share of examples where a true adapter got the largest
    mean weight on the answer-predicting tokens)."""
    rows, targets, weights = answer_rows(examples, boundary_weight)
    dev = engine.model.device
    out = engine.runner.prefill(
        [ex.ids for ex in examples],
        [(ex.candidates, ex.priors) for ex in examples],
        torch.tensor(rows, device=dev),
        gate,
        keep_layer_weights=True,
    )
    stats = out.gate_stats
    token_weights = torch.tensor(weights, device=dev)
    lm = (F.cross_entropy(out.logits, torch.tensor(targets, device=dev), reduction="none") * token_weights).sum()
    lm = lm / token_weights.sum()
    # Routing is scored on the tokens that predict the answer: they have read the whole request,
    # where earlier ones (the system prompt every example shares) cannot tell the task, and would
    # dilute a whole-sequence mean until a router that barely tilts toward the right adapter
    # counts as correct (docs/decisions.md).
    answer_weights = torch.stack(stats.layer_weights)[:, rows].split(
        [len(ex.ids) - ex.num_prompt for ex in examples], dim=1
    )  # per example [layers, answer tokens, U + 1]: the U columns, then the base column
    per_adapter: dict[str, list[torch.Tensor]] = {}  # each candidacy's mean weight over the whole sequence
    hits, route = 0, []
    for i, (ex, w) in enumerate(zip(examples, answer_weights)):
        w = w[..., [*stats.seq_columns[i], w.shape[-1] - 1]]  # [layers, answer tokens, k + 1] in candidate order
        hits += ex.candidates[int(w[..., :-1].mean((0, 1)).argmax())] in ex.true
        token_true = ex.token_true or [ex.true] * w.shape[1]
        columns = [*ex.candidates, BASE_COLUMN]
        rewarded = torch.tensor([[c in t for c in columns] for t in token_true], device=w.device)
        true_mass = (w * rewarded).sum(-1)  # [layers, answer tokens]
        route.append(-true_mass.clamp_min(1e-9).log().mean())
        means = stats.seq_sums(i)[:-EXTRA_COLUMNS] / (len(ex.ids) * engine.model.num_layers)  # [k]
        for name, m in zip(ex.candidates, means):
            per_adapter.setdefault(name, []).append(m)
    return lm, usage.balance(per_adapter), torch.stack(route).mean(), hits / len(examples)


def task_pairs(library: dict[str, str], n: int, seed: int) -> list[Pair]:
    """n pairs spread evenly over the library's tasks (task -> adapter)."""
    per_task = -(-n // len(library))
    pairs = [
        (p, a, (name,), None)
        for task, name in library.items()
        for p, a in TASKS[task].examples("train", per_task, seed=seed)
    ]
    random.Random(seed).shuffle(pairs)
    return pairs[:n]


def composite_pairs(library: dict[str, str], per_task: int, seed: int, part_routing: bool = False) -> list[Pair]:
    """per_task training examples of each composite task whose two skills the library holds."""
    return [
        (
            p,
            a,
            tuple(library[s] for s in c.skills),
            len(a.rsplit(", ", 1)[0]) if part_routing and c.shape == "sequential" else None,
        )
        for c in COMPOSITES.values()
        if set(c.skills) <= set(library)
        for p, a in c.examples("train", per_task, seed=seed)
    ]


def part_adapters(
    tokenizer, answer: str, first_part: int, true: tuple[str, str], spelled: bool = False, base: bool = False
) -> list[tuple[str, ...]]:
    """Per token of the encoded answer and its end token: (first skill's adapter,) up to the
    separator ", " after `first_part` characters, (second's,) from the token after the comma (a
    token " XL" carries the separator's space and the second part), both on a token with the comma,
    or with `base` the gate's base column there: the answer goes on where the first skill would end.
    spelled: the answer encoded one token per letter, as encode(spelled=True) does."""
    ids = answer_token_ids(tokenizer, answer, spelled)
    ends = [len(tokenizer.decode(ids[: j + 1])) for j in range(len(ids))]
    starts = [0, *ends[:-1]]
    second = first_part + len(",")
    boundary = (BASE_COLUMN,) if base else true
    return [
        true[:1] if end <= first_part else true[1:] if start >= second else boundary for start, end in zip(starts, ends)
    ] + [true[1:]]


def make_examples(engine, retriever, pairs: list[Pair], names: list[str], opts: GateTrainOptions) -> list[Example]:
    """Examples of the pairs: candidates from retrieval, priors as the docstring says."""
    rng = random.Random(opts.seed)
    queries = retriever.embedder.encode([p for p, *_ in pairs])  # [n, dim], unit norm
    retrieved = [[name for name, _ in hits] for hits in retriever.search_vectors(queries, opts.top_k)]
    sets = candidate_sets([t for _, _, t, _ in pairs], names, retrieved, opts, rng)
    tok = engine.tokenizer
    t_min = engine.settings.mixture_temperature
    t_max = max(opts.prior_temperature_max, t_min)
    examples = []
    for (p, a, t, first_part), cands, query in zip(pairs, sets, queries):
        scores = [float(query @ retriever.key(n)) for n in cands]
        priors = softmax(scores, t_min * (t_max / t_min) ** rng.random())
        if rng.random() < opts.uniform_priors:
            priors = [1.0 / len(cands)] * len(cands)
        # encoded as served: in the input form of the heaviest candidate (input_forms.set_input_form)
        spelled = set_input_form(cands, priors, engine.adapters.input_form) == SPELLED
        parts = part_adapters(tok, a, first_part, t, spelled, opts.fusion) if first_part is not None else None
        examples.append(
            Example(encode(tok, p, a, spelled), len(encode(tok, p, spelled=spelled)), cands, priors, t, parts)
        )
    return examples


def training_pairs(library: dict[str, str], opts: GateTrainOptions) -> list[Pair]:
    """The library's single tasks, or with composite_per_task the composite examples plus replay."""
    if not opts.composite_per_task:
        return task_pairs(library, opts.steps * opts.batch, opts.seed + 1)
    few = composite_pairs(library, opts.composite_per_task, opts.seed + 1, opts.part_routing)
    if not few:
        raise SystemExit("no composite task has both of its skills in the library")
    replay = task_pairs(library, round(len(few) * opts.replay / (1 - opts.replay)), opts.seed + 2)
    pairs = few + replay
    random.Random(opts.seed).shuffle(pairs)
    # epochs over the few-shot set until opts.steps batches
    return [pairs[i % len(pairs)] for i in range(opts.steps * opts.batch)]


def train_gate(engine, retriever, opts: GateTrainOptions, init: MoLEGate | None = None) -> tuple[MoLEGate, dict]:
    """Train a gate over every adapter in the engine's pool that has a task card (from `init` when
    given: few-shot fine-tuning); returns it and its log."""
    library = task_library(engine.settings.adapters_dir)
    if len(library) < 2:
        raise SystemExit(f"a gate needs at least 2 task adapters in {engine.settings.adapters_dir}")
    torch.manual_seed(opts.seed)
    base = Path(engine.model.config.name_or_path or "base").name
    config = GateConfig.for_base(
        base,
        engine.model.lora_spec(),
        rank=opts.rank,
        temperature=opts.temperature,
        fusion=opts.fusion,
        bias_by_base=opts.bias_by_base,
    )
    if init is None:
        gate = MoLEGate(config)
    elif opts.fusion and (init.config.fusion, init.config.bias_by_base) != (True, opts.bias_by_base):
        # the trained router, in the fusion form asked for (its new parameters, if any, at their start)
        gate = MoLEGate(replace(init.config, fusion=True, bias_by_base=opts.bias_by_base))
        gate.load_state_dict(init.state_dict(), strict=False)
    else:
        gate = init
    gate.requires_grad_(True)
    examples = make_examples(engine, retriever, training_pairs(library, opts), sorted(library.values()), opts)
    optim = torch.optim.Adam(gate.parameters(), lr=opts.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(optim, max_lr=opts.lr, total_steps=opts.steps, pct_start=0.1)
    log: list[dict] = []
    usage = UsageTracker()
    start = time.perf_counter()
    bar = tqdm(range(opts.steps), desc="train-gate", mininterval=10)
    for step in bar:
        lm, bal, route, acc = step_losses(
            engine, gate, examples[step * opts.batch : (step + 1) * opts.batch], usage, opts.boundary_weight
        )
        loss = lm + opts.balance_weight * bal + opts.route_weight * route
        loss.backward()
        optim.step()
        sched.step()
        optim.zero_grad(set_to_none=True)
        log.append(
            {
                "step": step,
                "lm": round(lm.item(), 4),
                "balance": round(bal.item(), 4),
                "route": round(route.item(), 4),
                "top1": acc,
            }
        )
        bar.set_postfix(lm=f"{lm.item():.3f}", bal=f"{bal.item():.3f}", top1=f"{acc:.2f}", refresh=False)
    tail = log[-20:]
    summary = {
        "options": asdict(opts),
        "library": sorted(library.values()),
        "wall_time_s": round(time.perf_counter() - start, 1),
        "first_lm_loss": log[0]["lm"],
        "final_lm_loss": round(sum(e["lm"] for e in tail) / len(tail), 4),
        "final_top1": round(sum(e["top1"] for e in tail) / len(tail), 4),
    }
    return gate.requires_grad_(False), {"summary": summary, "steps": log}


def save_gate(gate: MoLEGate, log: dict, out: Path) -> None:
    """Weights, config and training log, replacing the folder `out` in one rename."""

    def write(folder: Path) -> None:
        write_gate(gate, folder, {"trained_on": log["summary"]["library"]})
        (folder / "training_log.json").write_text(json.dumps(log, indent=1) + "\n")

    replace_folder(out, write)


def main(argv: list[str] | None = None) -> int:
    p = options_parser("mole-serve train-gate", "Train the MoLE router on the library.", GateTrainOptions)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--out", type=Path, default=None, help="gate folder to write (default: the store's gate/)")
    opts, args = parse_options(p, GateTrainOptions, argv)
    if opts.bias_by_base and not opts.fusion:
        p.error("--bias-by-base needs --fusion (it scales the fusion form's bias)")
    if opts.boundary_weight != 1.0 and not opts.part_routing:
        p.error("--boundary-weight needs --part-routing (it weighs the tokens between a composite's parts)")
    if args.threads:
        torch.set_num_threads(args.threads)
    from mole_serve.compose import build

    built = build(Settings(adapters_dir=args.adapters_dir), with_gate=False)
    engine, init = built.engine, None
    if opts.composite_per_task:
        if not 0 <= opts.replay < 1:
            p.error("--replay must be in [0, 1)")
        built.load_gate(Path(opts.init) if opts.init else args.adapters_dir / GATE_DIR)
        init = engine.pool.gate
    gate, log = train_gate(engine, built.catalog.retriever, opts, init)
    save_gate(gate, log, args.out or args.adapters_dir / GATE_DIR)
    print(json.dumps(log["summary"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
