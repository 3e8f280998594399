"""The Triton kernel backend of the batched LoRA op (MOLE_LORA_BACKEND=triton, the default on CUDA).

Layout: segments of rows that share their slots (SGMV), with decode rows as segments of their own.
The unit of heterogeneity in this server is a request's set of K (slot, weight) pairs, and every
token of a request shares it: a prefill chunk is one segment, a decode row a segment of one row
(consecutive decode rows with the same slots merge), and the dense path (few adapters shared by
many sequences) is a single segment of all rows against the U unique slots. A host-built tile
table, once per step, cuts segments into tiles of 16 rows (decode) or up to 64 (prefill), so a
tile loads each adapter's A and B once and multiplies with tl.dot, fp32 accumulation. Each of a
segment's columns reads only its own slot's rank rows (the stacks pad every slot to the largest
rank held): a larger adapter costs the rows that use it, not every row.

Why not the alternatives:
- Per-token index (BGMV) alone re-reads a prefill chunk's adapters for every token, and cannot use
  tensor cores.
- vLLM's one sorted-by-slot layout (rows = (token, k) pairs sorted by slot, grid over slots) shares
  an adapter's loads across requests, but a token's K contributions then land in K different
  programs: the expand needs atomics or a second reduction, so results depend on scheduling order,
  and per-token weights must travel with the sorted rows. Here a program owns a tile of a token's
  rows and all its K columns: the weighted sum over K stays in registers and out is read, added
  to and written once per tile, deterministically. Sharing across requests is what the dense
  path (chosen in batch.py) is for.

Shrink and expand stay two kernels because the gate (MoLE) scores the candidates from the
unweighted shrink z [T, C, n*r] before the weights exist; the weights are applied in the expand,
per token and column (or per token, module and expert for the MoE kinds). The rows of a fused
group (q/k/v, gate/up) come out of one shrink launch (their A stack is one [slots, n*r, d_in]) and
go into one expand launch (grid axis 2 = module, each B_j reached through a table of addresses).
MELoRA's native block form has its own fused kernel (tiny ranks: no tl.dot). The MoE kinds run
all of a MoE adapter's rows as one segment against its E expert slots, weights per (token, module,
expert); MixLoRA's per-expert FFN activations use the same two kernels, with the pick of each
token's k experts done in rank space in torch (a [T, k, E, r] tensor, not a gather of weights).
"""

from mole_serve.lora.backends.triton.backend import TritonBackend

__all__ = ["TritonBackend"]
