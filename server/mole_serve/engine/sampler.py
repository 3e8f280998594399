"""Next-token choice per sequence: logit_bias, min_tokens and the penalties, then greedy, or
temperature / min-p / top-k / top-p sampling.

Each feature runs batched over the rows that ask for it (a few tensor ops per step, whatever
their number); a step where no row asks skips it whole. Each sampled sequence draws its uniform
number from its own torch.Generator, so a seed gives the same output whatever else shares the batch.
"""

from __future__ import annotations

from collections.abc import Collection
from collections.abc import Sequence as Seq

import torch

from mole_serve.engine.request import Logprob, SamplingParams, Sequence


def to_device(values: Seq | torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Host values on the device without waiting for it: a copy from pageable memory synchronizes
    the stream (the host would wait for every kernel queued before), one from pinned memory does not."""
    host = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    if device.type == "cpu":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def make_generator(seed: int | None) -> torch.Generator:
    g = torch.Generator()
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed % (1 << 64))  # what manual_seed takes; equal seeds stay equal
    return g


def sample(
    logits: torch.Tensor,
    seqs: Seq[Sequence],
    generators: Seq[torch.Generator | None],
    eos_token_ids: Collection[int],
) -> torch.Tensor:
    """logits: float32 [N, V], row i the next-token logits of seqs[i] (its tokens so far in
    seq.token_ids) -> one token id per row, [N] on the logits' device: nothing here waits for the
    device. The caller's logits are left as they are."""
    biased = apply_bias(logits, seqs, eos_token_ids)
    logits = apply_penalties(biased, seqs, inplace=biased is not logits)  # (a copy already: change it)
    params = [seq.sampling for seq in seqs]
    tokens = logits.argmax(dim=-1)  # greedy for every row; sampled rows are overwritten below
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if rows:
        dev = logits.device
        index = to_device(rows, dev, torch.long)
        sub = logits.index_select(0, index)  # [S, V]
        temps = to_device([params[i].temperature for i in rows], dev, logits.dtype)
        candidates, ids = _candidates(_overflow_limit(sub / temps[:, None]), [params[i] for i in rows])  # [S, C]
        u = to_device(torch.cat([torch.rand(1, generator=generators[i]) for i in rows]), dev)  # [S]
        cdf = candidates.softmax(dim=-1).cumsum(dim=-1)
        picked = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None]).clamp_(max=cdf.shape[-1] - 1)  # [S, 1]
        tokens.index_copy_(0, index, (picked if ids is None else ids.gather(1, picked)).squeeze(1))
    return tokens


def apply_bias(logits: torch.Tensor, seqs: Seq[Sequence], eos_token_ids: Collection[int]) -> torch.Tensor:
    """Each row's logit_bias added, and -inf on its EOS (unless ignore_eos) and stop_token_ids while
    it has fewer than min_tokens outputs: one accumulating index_put over every (row, token) pair.
    logits: [N, V] -> a new tensor when any row asks, else the same one."""
    rows: list[int] = []
    ids: list[int] = []
    values: list[float] = []
    for i, seq in enumerate(seqs):
        p = seq.sampling
        rows += [i] * len(p.logit_bias)
        ids += [token for token, _ in p.logit_bias]
        values += [bias for _, bias in p.logit_bias]
        if len(seq.token_ids) - seq.num_prompt_tokens < p.min_tokens:
            banned = {*p.stop_token_ids, *(() if p.ignore_eos else eos_token_ids)}
            rows += [i] * len(banned)
            ids += banned
            values += [float("-inf")] * len(banned)  # -inf plus any bias stays -inf
    if not rows:
        return logits
    dev = logits.device
    index = (to_device(rows, dev, torch.long), to_device(ids, dev, torch.long))
    return logits.index_put(index, to_device(values, dev, logits.dtype), accumulate=True)


def apply_penalties(logits: torch.Tensor, seqs: Seq[Sequence], inplace: bool = False) -> torch.Tensor:
    """repetition_penalty over prompt and output tokens (vLLM and HF: a positive logit divided by
    it, a negative one multiplied), then frequency and presence penalties over output tokens
    (OpenAI: logit -= frequency * count + presence * (count > 0)), on the rows that set any.
    Only the logits of tokens in a row's history change: they are gathered at a padded [P, L]
    tensor of each row's tokens (the prompt too only where repetition_penalty needs it), changed,
    and written back; the output counts come from one scatter_add. logits: [N, V] -> a new tensor
    when any row asks (`inplace`: logits, changed), else the same one."""
    rows = [i for i, seq in enumerate(seqs) if seq.sampling.penalized]
    if not rows:
        return logits
    dev, V = logits.device, logits.shape[-1]
    params = [seqs[i].sampling for i in rows]
    # where each row's history starts: its prompt only counts for repetition_penalty
    starts = [0 if p.repetition_penalty != 1 else seqs[i].num_prompt_tokens for i, p in zip(rows, params)]
    histories = [seqs[i].token_ids[start:] for i, start in zip(rows, starts)]
    L = max(map(len, histories))
    if L == 0:  # nothing generated yet, and no repetition_penalty to count the prompt for
        return logits
    ids = to_device([h + [V] * (L - len(h)) for h in histories], dev, torch.long)  # [P, L], V: pad
    prompt_left = to_device([seqs[i].num_prompt_tokens - s for i, s in zip(rows, starts)], dev, torch.long)  # [P]
    is_output = (torch.arange(L, device=dev)[None, :] >= prompt_left[:, None]).to(logits.dtype)  # [P, L]
    counts = torch.zeros(len(rows), V + 1, dtype=logits.dtype, device=dev).scatter_add_(1, ids, is_output)
    counts = counts.gather(1, ids)  # [P, L]: each history token's count in the output

    real = ids < V  # [P, L]
    row_of = torch.arange(len(rows), device=dev)[:, None].expand(-1, L)[real]  # [H]: p of every history token
    index, ids, counts = to_device(rows, dev, torch.long)[row_of], ids[real], counts[real]  # [H], repeats kept

    def per_token(name: str) -> torch.Tensor:
        return to_device([getattr(p, name) for p in params], dev, logits.dtype)[row_of]  # [H]

    values = logits[index, ids]  # [H]
    # clamped: in float32 a penalty under 1.2e-38 reads 0 and one over 3.4e38 inf (-inf * 0 and 0 * inf are NaN)
    finfo = torch.finfo(logits.dtype)
    repetition = per_token("repetition_penalty").clamp(finfo.tiny, finfo.max)
    values = torch.where(values > 0, values / repetition, values * repetition)
    values = values - per_token("frequency_penalty") * counts - per_token("presence_penalty") * (counts > 0)
    # a token seen twice is written twice, with the same value
    return logits.index_put_((index, ids), values) if inplace else logits.index_put((index, ids), values)


def _overflow_limit(logits: torch.Tensor) -> torch.Tensor:
    """A row holding +inf logits (a tiny temperature or repetition_penalty overflowed them; softmax
    would give NaN) as the limit of its distribution: uniform over those tokens. logits: [S, V]."""
    top = torch.isposinf(logits)  # (no `if top.any()`: that would wait for the device)
    return torch.where(top.any(dim=-1, keepdim=True), torch.where(top, 0.0, float("-inf")), logits)


def _candidates(logits: torch.Tensor, params: Seq[SamplingParams]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each row's sampling set after min-p, top-k and top-p, for logits [S, V] already divided by
    the temperature: (their logits [S, C], -inf outside the set; their token ids [S, C]), in id
    order, or (logits [S, V], None): every token. With every row under a top-k, only the C = max k
    most likely are ranked (topk), not the whole vocabulary."""
    if any(p.min_p > 0 for p in params):
        # p < min_p * p_max, in logits: l < l_max + log(min_p) (min_p 0: -inf, nothing dropped)
        log_min_p = to_device([p.min_p for p in params], logits.device, logits.dtype).log()
        floor = logits.max(dim=-1, keepdim=True).values + log_min_p[:, None]  # [S, 1]
        logits = logits.masked_fill(logits < floor, float("-inf"))
    if all(p.top_k <= 0 and p.top_p >= 1.0 for p in params):
        return logits, None
    V = logits.shape[-1]
    C = V if any(p.top_k <= 0 for p in params) else min(V, max(p.top_k for p in params))
    top, ids = logits.topk(C, dim=-1) if C < V else logits.sort(dim=-1, descending=True)  # [S, C]
    ks = to_device([min(p.top_k, C) if p.top_k > 0 else C for p in params], logits.device, torch.long)
    top = top.masked_fill(torch.arange(C, device=logits.device)[None, :] >= ks[:, None], float("-inf"))
    # (top_p 1 cuts nothing: not even the tail a float cumsum reaches 1 before)
    top_ps = to_device([p.top_p if p.top_p < 1 else float("inf") for p in params], logits.device, logits.dtype)
    probs = top.softmax(dim=-1)  # renormalized over the top-k, as HF does
    # A token is kept while the mass before it is under top_p (the first token always stays).
    mass_before = probs.cumsum(dim=-1) - probs
    top = top.masked_fill(mass_before >= top_ps[:, None], float("-inf"))
    # Back in id order, so that a row draws the same token whatever C its batch needed.
    if C == V:
        return torch.empty_like(logits).scatter_(1, ids, top), None
    ids, order = ids.sort(dim=-1)
    return top.gather(1, order), ids


def logprobs_of(logits: torch.Tensor, tokens: torch.Tensor, top: Seq[int]) -> list[Logprob]:
    """Each row's token logprob and its `top[i]` best alternatives. logits: [R, V]; tokens: [R].
    The host reads two tensors: ids (the tokens, then the alternatives) and their logprobs."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # [R, V]
    chosen = logprobs.gather(1, tokens.view(-1, 1))  # [R, 1]
    best = logprobs.topk(max(top, default=0), dim=-1)  # [R, k]
    ids = torch.cat([tokens.view(-1, 1), best.indices], dim=1).tolist()
    values = torch.cat([chosen, best.values], dim=1).tolist()
    return [
        (row_ids[0], row_values[0], tuple(zip(row_ids[1 : 1 + k], row_values[1 : 1 + k])))
        for row_ids, row_values, k in zip(ids, values, top)
    ]
