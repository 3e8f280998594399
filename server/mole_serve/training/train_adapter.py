"""Train one task adapter on the base model and write it, with its card, into adapters_store/:
a LoRA through PEFT (kind `lora`), a MELoRA through training/melora.py (kind `melora`), or a
MixLoRA / MoELoRA through training/moe.py. Task `multitask` trains on the mixture of all tasks
(the MixLoRA paper's setting) and evaluates on each.

Loss is on the assistant answer only, and the LM head runs only on the positions that predict answer
tokens: on a small model with a large vocabulary that head is a large share of the forward cost.
Eval is greedy decoding on held-out inputs and phrasings, for the base model and for the adapter.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import PretrainedConfig

from mole_serve.config import Settings
from mole_serve.engine.model import FAMILIES, family_config
from mole_serve.input_forms import SPELLED, form_messages
from mole_serve.lora.kinds import RUNS_ALONE
from mole_serve.lora.kinds.base import FUSED_MODULES, TARGET_MODULES
from mole_serve.spelling import letter_token_ids
from mole_serve.training.tasks import OUT_OF_DOMAIN, TASKS, Task, task_library

SYSTEM_PROMPT = "You are a helpful assistant."
MULTITASK = "multitask"  # the pseudo-task of one adapter trained on the mixture of all tasks
MULTITASK_DESCRIPTION = "One adapter for all library tasks, trained on their mixture"
PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")


def fuses_projections(config: PretrainedConfig) -> bool:
    """Whether the base model's checkpoint (and transformers' modules) fuse q/k/v and gate/up (Phi-3)."""
    family = FAMILIES.get(family_config(config).model_type)
    return family is not None and family.fused_checkpoint


def base_targets(config: PretrainedConfig) -> tuple[str, ...]:
    """Every projection of the base model, named as its transformers modules are (PEFT matches
    target_modules against those): qkv_proj and gate_up_proj where the family fuses them, else
    the seven projections."""
    if not fuses_projections(config):
        return TARGET_MODULES
    fused_of = {part: fused for fused, parts in FUSED_MODULES.items() for part in parts}
    return tuple(dict.fromkeys(fused_of.get(m, m) for m in TARGET_MODULES))


def build_chat(prompt: str) -> list[dict]:
    """The messages every adapter is trained and evaluated with; the server should send the same."""
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": prompt}]


@dataclass
class TrainOptions:
    kind: str = "lora"  # or "melora", "mixlora", "moelora"
    rank: int = 8  # melora: the rank of each mini LoRA
    blocks: int = 8  # melora: n, the mini LoRAs per module
    alpha: int = 16
    experts: int = 8  # mixlora / moelora: E
    top_k: int = 2
    balance_coef: float = 0.01  # MoE-PEFT's router_aux_loss_coef (its README's top-k example)
    contrastive_coef: float = 0.01  # moelora: lambda of the contrastive loss
    contrastive_tau: float = 0.1
    contrastive_tokens: int = 32  # moelora: tokens sampled per routed linear and step
    targets: tuple[str, ...] = ()  # module names; () for every projection of the base (base_targets)
    steps: int = 240
    batch: int = 8
    lr: float = 2e-3
    seed: int = 0
    warmup: int = 10
    stop_loss: float = 0.01  # stop early once the mean answer loss of the last 10 steps is below this
    n_eval: int = 64
    eval_batch: int = 32
    n_card_examples: int = 32
    resume: str = ""  # lora: continue training the adapter in this folder (a fresh schedule)
    by_name_only: bool = False  # the card's auto: false (retrieval never picks it)


# --- data -------------------------------------------------------------------------------------


def encode(tokenizer, prompt: str, answer: str | None = None, spelled: bool = False) -> list[int]:
    """Chat-templated ids up to the assistant turn, then the answer and the end-of-turn token.
    spelled: the prompt's words spelled out, the answer one token per letter (mole_serve/spelling.py)."""
    chat = form_messages(SPELLED, build_chat(prompt)) if spelled else build_chat(prompt)
    text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if answer is not None:
        ids += answer_token_ids(tokenizer, answer, spelled) + [tokenizer.eos_token_id]
    return ids


def answer_token_ids(tokenizer, answer: str, spelled: bool = False) -> list[int]:
    """An answer's ids, without the end token; spelled: one token per letter."""
    return letter_token_ids(tokenizer, answer) if spelled else tokenizer(answer, add_special_tokens=False).input_ids


def collate(tokenizer, pairs: list[tuple[str, str]], spelled: bool = False) -> dict[str, torch.Tensor]:
    """Right-padded batch plus the (row, col) of every answer token: col - 1 predicts it."""
    seqs, rows, cols = [], [], []
    for i, (prompt, answer) in enumerate(pairs):
        n_prompt = len(encode(tokenizer, prompt, spelled=spelled))
        ids = encode(tokenizer, prompt, answer, spelled)
        seqs.append(ids)
        rows += [i] * (len(ids) - n_prompt)
        cols += range(n_prompt, len(ids))
    width = max(map(len, seqs))
    input_ids = torch.full((len(seqs), width), tokenizer.pad_token_id)  # [B, T]
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, ids in enumerate(seqs):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "rows": torch.tensor(rows), "cols": torch.tensor(cols)}


def answer_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over answer tokens; `model` is a causal LM (LoRA layers injected or not)."""
    hidden = model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    h = hidden.last_hidden_state[batch["rows"], batch["cols"] - 1]  # [N answer tokens, H]
    logits = model.get_output_embeddings()(h)  # [N, V]
    return F.cross_entropy(logits.float(), batch["input_ids"][batch["rows"], batch["cols"]])


# --- training and eval ------------------------------------------------------------------------


def lr_factor(step: int, opts: TrainOptions) -> float:
    """Linear warmup, then linear decay to zero at opts.steps."""
    if step < opts.warmup:
        return (step + 1) / opts.warmup
    return max(0.0, (opts.steps - step) / max(1, opts.steps - opts.warmup))


def train_lora(
    model,
    tokenizer,
    pairs: list[tuple[str, str]],
    opts: TrainOptions,
    extra_loss: Callable[[dict], torch.Tensor] | None = None,
    spelled: bool = False,
) -> list[float]:
    """Run the optimisation on `pairs` (opts.steps * opts.batch of them); returns the answer loss per
    step. model: the causal LM with its adapter modules injected (only they require grad);
    extra_loss(batch): the kind's own terms after the forward (routers' balance, contrastive);
    spelled: the pairs encoded as a spelled-input adapter reads and writes them."""
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=opts.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: lr_factor(s, opts))
    model.train()
    losses: list[float] = []
    bar = tqdm(range(opts.steps), desc="train", mininterval=5)
    for step in bar:
        batch = collate(tokenizer, pairs[step * opts.batch : (step + 1) * opts.batch], spelled)
        loss = answer_loss(model, batch)
        (loss + extra_loss(batch) if extra_loss else loss).backward()
        optim.step()
        sched.step()
        optim.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        if len(losses) >= 10 and sum(losses[-10:]) / 10 < opts.stop_loss:
            break
    model.eval()
    return losses


@torch.no_grad()
def generate(
    model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 32, spelled: bool = False
) -> list[str]:
    """Greedy answers, batched with left padding; spelled: the prompts' words spelled out."""
    out: list[str] = []
    model.eval()
    for start in range(0, len(prompts), batch_size):
        seqs = [encode(tokenizer, p, spelled=spelled) for p in prompts[start : start + batch_size]]
        width = max(map(len, seqs))
        ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(s)) + s for s in seqs])  # [B, T]
        mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
        gen = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        out += tokenizer.batch_decode(gen[:, width:], skip_special_tokens=True)
    return out


def accuracy(
    model, tokenizer, task: Task, pairs: list[tuple[str, str]], batch_size: int = 32, spelled: bool = False
) -> float:
    preds = generate(model, tokenizer, [p for p, _ in pairs], task.max_new_tokens, batch_size, spelled)
    return sum(task.score(pred, ans) for pred, (_, ans) in zip(preds, pairs, strict=True)) / len(pairs)


# --- one adapter, end to end ------------------------------------------------------------------


def load_base(settings: Settings):
    """(model, tokenizer, base model name) from the local base folder, fp32 for CPU training."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mole_serve.engine.loader import resolve_base_model

    path = resolve_base_model(settings)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(path), path.name


def save_adapter(write_weights, card: dict, out_dir: Path) -> None:
    """The adapter's files (write_weights(folder): config + safetensors) and card.json, written to
    a temp dir and renamed into place."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}-"))
    try:
        write_weights(tmp)
        for extra in set(os.listdir(tmp)) - set(PEFT_FILES):  # PEFT also writes a README stub
            os.remove(tmp / extra)
        (tmp / "card.json").write_text(json.dumps(card, indent=2) + "\n")
        for path in tmp.iterdir():  # mkdtemp and safetensors leave owner-only modes
            path.chmod(0o644)
        tmp.chmod(0o755)
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def train_adapter(
    task_name: str,
    out_dir: Path,
    opts: TrainOptions | None = None,
    settings: Settings | None = None,
    model=None,
    tokenizer=None,
    base_model_name: str | None = None,
) -> dict:
    """Train the adapter of one task and write it to out_dir; returns its card. `model` is consumed
    (adapter layers are injected into it); without one the base model of `settings` is loaded."""
    opts = opts or TrainOptions()
    settings = settings or Settings()
    # the mixture is the library's tasks: the tasks without an adapter stay out of its domain
    tasks = sorted(task_library(settings.adapters_dir)) if task_name == MULTITASK else [task_name]
    if model is None:
        model, tokenizer, base_model_name = load_base(settings)
    if opts.kind != "lora" and fuses_projections(model.config):
        # training/melora.py and training/moe.py wrap the separate q/k/v and gate/up modules
        raise ValueError(
            f"kind {opts.kind!r} trains on separate q/k/v and gate/up projections, which "
            f"{model.config.model_type} fuses; train kind 'lora' on it"
        )
    if not opts.targets:
        opts = replace(opts, targets=base_targets(model.config))
    base_model_name = base_model_name or getattr(model.config, "name_or_path", "") or "unknown"
    # the fixed eval sets, whatever the seed; a mixture evaluates on each task
    n_eval = opts.n_eval if len(tasks) == 1 else max(1, opts.n_eval // 4)
    eval_sets = {t: TASKS[t].examples("eval", n_eval, seed=0) for t in tasks}
    spelled = len(tasks) == 1 and TASKS[tasks[0]].spelled  # (a mixture reads plain input)
    base_acc = {
        t: accuracy(model, tokenizer, TASKS[t], pairs, opts.eval_batch, spelled) for t, pairs in eval_sets.items()
    }
    torch.manual_seed(opts.seed)  # A init
    trained, write_weights, extra_loss = inject(model, opts, base_model_name)
    train_pairs = training_pairs(tasks, opts.steps * opts.batch, opts.seed)
    start = time.perf_counter()
    losses = train_lora(trained, tokenizer, train_pairs, opts, extra_loss, spelled)
    wall = time.perf_counter() - start
    steps_before, wall_before = 0, 0.0
    examples = list(dict.fromkeys(p for p, _ in train_pairs))[: opts.n_card_examples]
    if opts.resume:  # the card counts the whole training and keeps its examples (retrieval's keys)
        previous = json.loads((Path(opts.resume) / "card.json").read_text())
        steps_before, wall_before, examples = previous["steps"], previous["wall_time_s"], previous["examples"]
        config = json.loads((Path(opts.resume) / "adapter_config.json").read_text())
        opts = replace(opts, rank=config["r"], alpha=config["lora_alpha"])  # the shape it was trained with
    adapter_acc = {
        t: accuracy(trained, tokenizer, TASKS[t], pairs, opts.eval_batch, spelled) for t, pairs in eval_sets.items()
    }
    task = TASKS[tasks[0]]
    card = {
        "name": out_dir.name,
        "description": task.description if len(tasks) == 1 else MULTITASK_DESCRIPTION,
        "task": task.name if len(tasks) == 1 else MULTITASK,
        "family": task.family if len(tasks) == 1 else MULTITASK,
        "base_model": base_model_name,
        "kind": opts.kind,
        "trainable_params": sum(p.numel() for p in trained.parameters() if p.requires_grad),
        "examples": examples,
        "system_prompt": SYSTEM_PROMPT,
        "training": {k: v for k, v in asdict(opts).items() if k != "eval_batch"},
        "steps": steps_before + len(losses),
        "wall_time_s": round(wall_before + wall, 1),
        "first_loss": round(losses[0], 4),
        "final_loss": round(sum(losses[-10:]) / len(losses[-10:]), 4),
        "base_accuracy": sum(base_acc.values()) / len(tasks),
        "adapter_accuracy": sum(adapter_acc.values()) / len(tasks),
        "n_eval": sum(map(len, eval_sets.values())),
    }
    if spelled:
        card["input"] = SPELLED
    if len(tasks) > 1:
        card["per_task_accuracy"] = {t: {"base": base_acc[t], "adapter": adapter_acc[t]} for t in tasks}
    if opts.kind in ("mixlora", "moelora") or opts.by_name_only:
        card["auto"] = False  # a mixture runs alone (its routers mix its experts); a card may set true
    save_adapter(write_weights, card, out_dir)
    return card


def training_pairs(tasks: list[str], n: int, seed: int) -> list[tuple[str, str]]:
    """n training pairs: one task's, or a shuffled mixture with an equal share of each task's."""
    if len(tasks) == 1:
        return TASKS[tasks[0]].examples("train", n, seed=seed)
    pairs = [pair for t in tasks for pair in TASKS[t].examples("train", -(-n // len(tasks)), seed=seed)]
    random.Random(seed).shuffle(pairs)
    return pairs[:n]


def inject(model, opts: TrainOptions, base_model_name: str):
    """(the model with the trainable adapter modules in it, a function writing the adapter's files,
    the kind's extra loss or None)."""
    if opts.kind == "melora":
        from mole_serve.training.melora import inject_melora, save_melora

        injected = inject_melora(model, opts.targets, opts.blocks, opts.rank, opts.alpha)
        return (
            model,
            lambda folder: save_melora(
                injected, folder, opts.targets, opts.blocks, opts.rank, opts.alpha, base_model_name
            ),
            None,
        )
    if opts.kind in ("mixlora", "moelora"):
        return inject_moe_kind(model, opts, base_model_name)
    from peft import LoraConfig, PeftModel, get_peft_model

    if opts.resume:
        peft_model = PeftModel.from_pretrained(model, opts.resume, is_trainable=True)
    else:
        config = LoraConfig(
            r=opts.rank,
            lora_alpha=opts.alpha,
            target_modules=list(opts.targets),
            lora_dropout=0.0,
            bias="none",
            task_type="CAUSAL_LM",
        )
        peft_model = get_peft_model(model, config)
        peft_model.peft_config["default"].base_model_name_or_path = base_model_name

    def write(folder: Path) -> None:
        peft_model.save_pretrained(folder, safe_serialization=True)

    return peft_model.get_base_model(), write, None


def inject_moe_kind(model, opts: TrainOptions, base_model_name: str):
    from mole_serve.training.moe import balance_loss, contrastive_loss, inject_moe, save_moe

    E, k = opts.experts, opts.top_k
    routed = inject_moe(model, opts.kind, opts.targets, E, k, opts.rank, opts.alpha)
    generator = torch.Generator().manual_seed(opts.seed)

    def extra_loss(batch: dict) -> torch.Tensor:
        mask = batch["attention_mask"].reshape(-1).bool()
        loss = balance_loss(routed, mask, k, opts.balance_coef)
        if opts.kind == "moelora" and opts.contrastive_coef:
            loss = loss + opts.contrastive_coef * contrastive_loss(
                routed, mask, opts.contrastive_tau, opts.contrastive_tokens, generator
            )
        return loss

    options = {"router_aux_loss_coef": opts.balance_coef}
    if opts.kind == "moelora":
        options |= {"contrastive_coef": opts.contrastive_coef, "contrastive_tau": opts.contrastive_tau}
    return (
        model,
        lambda folder: save_moe(
            model, opts.kind, folder, opts.targets, E, k, opts.rank, opts.alpha, base_model_name, options
        ),
        extra_loss,
    )


# --- the library ------------------------------------------------------------------------------


def library_table(store_dir: Path) -> str:
    """Markdown table of every card under store_dir (one row per adapter folder)."""
    rows = [
        "| adapter | kind | rank | task | family | auto | input | base acc | adapter acc | steps | train time (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for card_path in sorted(Path(store_dir).glob("*/card.json")):
        c = json.loads(card_path.read_text())
        kind = c.get("kind", "lora")
        auto = c.get("auto", kind not in RUNS_ALONE)
        t = c["training"]
        rank = f"{t['blocks']} x {t['rank']}" if kind == "melora" else t["rank"]  # MELoRA: mini LoRAs x rank
        rows.append(
            f"| {c['name']} | {kind} | {rank} | {c['description']} | {c['family']} | {'yes' if auto else 'no'} "
            f"| {c.get('input', 'plain')} | {c['base_accuracy']:.0%} "
            f"| {c['adapter_accuracy']:.0%} | {c['steps']} | {c['wall_time_s']:.0f} |"
        )
    return "\n".join(rows)


def write_library_readme(store_dir: Path) -> None:
    text = (
        "# adapters_store\n\n"
        "Task LoRAs trained on the base model by `mole-serve train-adapter --all` "
        "(mole_serve/training/train_adapter.py; tasks in mole_serve/training/tasks.py), MELoRA twins of the four "
        "hardest tasks (`-melora`: 8 mini LoRAs of rank 1, 1/8 of the LoRA's parameters; served by name "
        "only, `--by-name-only`, so `auto`'s candidates hold one adapter per task) and two mixtures of LoRA "
        "experts over all tasks (`multitask-*`). "
        "`auto`: whether retrieval may pick the adapter (the card's field); the others serve by name only. "
        "`input`: `spelled` adapters get the user's words each followed by their letters (mole_serve/spelling.py). "
        "Accuracy is exact match with greedy decoding on held-out phrasings (phrasing families and input "
        "formats no adapter trained on) over held-out inputs; each folder's card.json has the training "
        "config, example prompts and the numbers below.\n\n" + library_table(store_dir) + "\n\n"
        "Beside the adapters: `retriever/`, the retrieval projection (`mole-serve train-retriever`), and "
        "`gate/`, the MoLE router in its fusion form (`mole-serve train-gate`: a single-task router, then "
        "fine-tuned on the composite tasks, docs/composition.md), each with its config and training log. "
        "Train them in that order after the adapters change: the gate learns on retrieval's candidates.\n"
    )
    (Path(store_dir) / "README.md").write_text(text)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="mole-serve train-adapter", description="Train task LoRAs.")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--task",
        nargs="+",
        choices=[*sorted(TASKS), MULTITASK],
        help=f"train these tasks, in order ({MULTITASK}: one adapter on the mixture of all)",
    )
    which.add_argument("--all", action="store_true", help="(re)build the whole library")
    p.add_argument("--out", type=Path, default=Path("adapters_store"), help="library folder")
    p.add_argument("--suffix", default="", help="adapter folder = task + this (e.g. -melora)")
    p.add_argument("--force", action="store_true", help="retrain adapters whose folder exists")
    d = TrainOptions()
    p.add_argument("--kind", choices=("lora", "melora", "mixlora", "moelora"), default=d.kind)
    p.add_argument("--experts", type=int, default=d.experts, help="mixlora/moelora: experts per router")
    p.add_argument("--top-k", type=int, default=d.top_k, help="mixlora/moelora: experts per token")
    p.add_argument("--balance-coef", type=float, default=d.balance_coef, help="load-balance loss coefficient")
    p.add_argument("--contrastive-coef", type=float, default=d.contrastive_coef, help="moelora: contrastive loss")
    p.add_argument("--n", type=int, default=d.blocks, help="melora: mini LoRAs per module")
    p.add_argument("--rank", "--r", type=int, default=d.rank, help="rank (melora: of each mini LoRA)")
    p.add_argument("--alpha", type=int, default=d.alpha)
    p.add_argument(
        "--targets",
        default=",".join(d.targets),
        help="comma-separated module names (default: every projection, named as the base model's modules)",
    )
    p.add_argument("--steps", type=int, default=d.steps, help="most optimizer steps")
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--stop-loss", type=float, default=d.stop_loss, help="early-stop threshold (0: never)")
    p.add_argument("--n-eval", type=int, default=d.n_eval, help="eval prompts per task")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument(
        "--by-name-only",
        action="store_true",
        help="the card says auto: false: served by name, "
        "never a retrieval candidate (e.g. a second adapter of a task already in the library)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="lora: continue training the adapter in its folder "
        "(a fresh schedule of --steps; pass another --seed for new examples)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    opts = TrainOptions(
        kind=args.kind,
        rank=args.rank,
        blocks=args.n,
        alpha=args.alpha,
        experts=args.experts,
        top_k=args.top_k,
        balance_coef=args.balance_coef,
        contrastive_coef=args.contrastive_coef,
        targets=tuple(t for t in args.targets.split(",") if t),
        steps=args.steps,
        batch=args.batch,
        lr=args.lr,
        seed=args.seed,
        stop_loss=args.stop_loss,
        n_eval=args.n_eval,
        by_name_only=args.by_name_only,
    )
    names = sorted(set(TASKS) - set(OUT_OF_DOMAIN)) if args.all else args.task
    for name in names:
        out_dir = args.out / f"{name}{args.suffix}"
        if args.resume:
            if args.kind != "lora" or not (out_dir / "card.json").is_file():
                raise SystemExit(f"--resume continues a trained lora: {out_dir} has none")
            opts = replace(opts, resume=str(out_dir))
        elif (out_dir / "card.json").is_file() and not args.force:
            print(f"{name}: exists, skipped (--force retrains)", flush=True)
            continue
        card = train_adapter(name, out_dir, opts, Settings())
        print(
            f"{name}: base {card['base_accuracy']:.0%} -> adapter {card['adapter_accuracy']:.0%} "
            f"in {card['steps']} steps, {card['wall_time_s']:.0f} s",
            flush=True,
        )
        write_library_readme(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
