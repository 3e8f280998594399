"""Train the retrieval projection on the adapter library (`mole-serve train-retriever`).

LoraRetriever trains its sentence encoder so that prompts land near the adapter of their task. Here
MiniLM stays frozen and a residual map e -> normalize(e + delta e) [dim] -> [dim] is learned instead
(mole_serve.routing.retriever.RetrievalProjection): a contrastive loss over the library's adapters, each
prompt against every adapter's card key computed through the same map, on prompts of the task
generators' *train* phrasings (the eval phrasings stay unseen). Two terms keep it general:
- weight decay on delta keeps the map near the identity, which is what lets it carry over to tasks
  it never trained on (bench.retrieval measures that by leaving each task out in turn);
- a hinge pulls each prompt's cosine to its own key up to `margin`, so scores keep the plain
  encoder's scale and the similarity floor keeps turning general chat away.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mole_serve.config import Settings
from mole_serve.library.store import PROJECTION_DIR, adapter_dirs, read_card, replace_folder
from mole_serve.routing.retriever import FINGERPRINT_TEXT, Embedder, RetrievalProjection, project
from mole_serve.training.options import options_parser, parse_options
from mole_serve.training.tasks import TASKS, task_library


@dataclass
class ProjectionTrainOptions:
    steps: int = 300
    lr: float = 1e-3
    temperature: float = 0.05  # of the softmax over cosines
    weight_decay: float = 1e-3  # x ||delta||^2
    margin: float = 0.7  # cosine each prompt is pulled up to at its own key
    margin_weight: float = 0.3
    per_task: int = 200  # train-phrasing prompts per task
    seed: int = 7


def projected_keys(delta: torch.Tensor, cards: list[torch.Tensor]) -> torch.Tensor:
    """LoraRetriever's key (normalized mean of the normalized examples) in the projected space. [n, dim]"""
    return F.normalize(torch.stack([project(delta, c).mean(0) for c in cards]), dim=-1)


def fit_projection(
    prompts: dict[str, torch.Tensor], cards: dict[str, torch.Tensor], opts: ProjectionTrainOptions
) -> tuple[np.ndarray, list[dict]]:
    """delta [dim, dim] from prompt embeddings [n_i, dim] and card-example embeddings [m_i, dim] per
    adapter name (plain encoder, L2-normalized); returns it and the per-step log."""
    names = list(prompts)
    x = torch.cat([prompts[n] for n in names])  # [N, dim]
    y = torch.cat([torch.full((len(prompts[n]),), i) for i, n in enumerate(names)])  # [N]
    delta = torch.zeros(x.shape[1], x.shape[1], requires_grad=True)
    optim = torch.optim.Adam([delta], lr=opts.lr)
    log = []
    for step in range(opts.steps):
        scores = project(delta, x) @ projected_keys(delta, [cards[n] for n in names]).T  # [N, adapters]
        contrastive = F.cross_entropy(scores / opts.temperature, y)
        hinge = F.relu(opts.margin - scores.gather(1, y[:, None])).mean()
        loss = contrastive + opts.margin_weight * hinge + opts.weight_decay * delta.pow(2).sum()
        optim.zero_grad()
        loss.backward()
        optim.step()
        if step % 25 == 0 or step == opts.steps - 1:
            top1 = (scores.argmax(1) == y).float().mean()
            log.append(
                {
                    "step": step,
                    **{
                        k: round(v.item(), 4)
                        for k, v in {
                            "loss": loss,
                            "contrastive": contrastive,
                            "hinge": hinge,
                            "top1": top1,
                            "delta_norm": delta.norm(),
                        }.items()
                    },
                }
            )
    return delta.detach().numpy(), log


def library_embeddings(
    embedder: Embedder, adapters_dir: Path, per_task: int, seed: int
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Train-phrasing prompt embeddings and card-example embeddings per task adapter, by `embedder`."""
    library = task_library(adapters_dir)  # task -> adapter name
    folders = adapter_dirs(adapters_dir)
    embed = lambda texts: torch.from_numpy(embedder.encode(texts))  # noqa: E731
    prompts = {
        name: embed([p for p, _ in TASKS[task].examples("train", per_task, seed)])
        for task, name in sorted(library.items())
    }
    cards = {name: embed(read_card(folders[name])["examples"]) for name in prompts}
    return prompts, cards


def main(argv: list[str] | None = None) -> int:
    p = options_parser(
        "mole-serve train-retriever",
        "Train the retrieval projection on the library's task adapters.",
        ProjectionTrainOptions,
    )
    opts, args = parse_options(p, ProjectionTrainOptions, argv)
    settings = Settings(adapters_dir=args.adapters_dir)
    embedder = Embedder(settings.embedder, settings.embedder_device)  # plain: the projection's input space
    start = time.perf_counter()
    prompts, cards = library_embeddings(embedder, args.adapters_dir, opts.per_task, opts.seed)
    if len(prompts) < 2:
        raise SystemExit(f"a retrieval projection needs at least 2 task adapters in {args.adapters_dir}")
    delta, log = fit_projection(prompts, cards, opts)
    projection = RetrievalProjection(delta, embedder.encode([FINGERPRINT_TEXT])[0])
    summary = {
        "options": asdict(opts),
        "trained_on": list(prompts),
        "final": log[-1],
        "wall_time_s": round(time.perf_counter() - start, 1),
    }

    def write(folder: Path) -> None:
        projection.save(folder, {"trained_on": summary["trained_on"], "options": summary["options"]})
        (folder / "training_log.json").write_text(json.dumps({"summary": summary, "steps": log}, indent=1) + "\n")

    replace_folder(args.adapters_dir / PROJECTION_DIR, write)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
