"""Next-token choice per sequence: greedy, or temperature / top-k / top-p sampling.

Each sampled sequence draws its uniform number from its own torch.Generator, so a seed gives
the same output whatever else shares the batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mole_serve.engine.request import Logprob, SamplingParams


def make_generator(seed: int | None) -> torch.Generator:
    g = torch.Generator()
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed % (1 << 64))  # what manual_seed takes; equal seeds stay equal
    return g


def sample(
    logits: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None]
) -> list[int]:
    """logits: float32 [N, V] -> one token id per row."""
    tokens = logits.argmax(dim=-1)  # greedy for every row; sampled rows are overwritten below
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if rows:
        sub = logits[rows]  # [S, V]
        temps = torch.tensor([params[i].temperature for i in rows], device=sub.device)
        probs = _filter_top_k_top_p(sub / temps[:, None], [params[i] for i in rows]).softmax(dim=-1)
        u = torch.cat([torch.rand(1, generator=generators[i]) for i in rows]).to(sub.device)  # [S]
        cdf = probs.cumsum(dim=-1)
        picked = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None]).squeeze(1)
        tokens[rows] = picked.clamp_(max=probs.shape[-1] - 1)
    return tokens.tolist()


def _filter_top_k_top_p(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Set logits outside each row's top-k and top-p nucleus to -inf. logits: [S, V]."""
    if all(p.top_k == 0 and p.top_p >= 1.0 for p in params):
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    V = logits.shape[-1]
    ks = torch.tensor([p.top_k if p.top_k > 0 else V for p in params], device=logits.device)
    ranks = torch.arange(V, device=logits.device)[None, :]
    sorted_logits = sorted_logits.masked_fill(ranks >= ks[:, None], float("-inf"))
    top_ps = torch.tensor([p.top_p for p in params], device=logits.device)
    probs = sorted_logits.softmax(dim=-1)  # renormalized over the top-k, as HF does
    # A token is kept while the mass before it is under top_p (the first token always stays).
    mass_before = probs.cumsum(dim=-1) - probs
    sorted_logits = sorted_logits.masked_fill(mass_before >= top_ps[:, None], float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def logprobs_of(logits: torch.Tensor, tokens: torch.Tensor, top: Sequence[int]) -> list[Logprob]:
    """Each row's token logprob and its `top[i]` best alternatives. logits: [R, V]; tokens: [R]."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # [R, V]
    chosen = logprobs.gather(1, tokens.view(-1, 1)).squeeze(1).tolist()
    k = max(top, default=0)
    best = logprobs.topk(k, dim=-1) if k else None
    out = []
    for i, (token, lp) in enumerate(zip(tokens.tolist(), chosen)):
        alternatives = (
            () if best is None else tuple(zip(best.indices[i, : top[i]].tolist(), best.values[i, : top[i]].tolist()))
        )
        out.append((token, lp, alternatives))
    return out
