"""Static weighted merges of LoRA adapters into one virtual adapter (the `merge` composition mode).

The result equals PEFT's `LoraModel.add_weighted_adapter(adapters, weights, name, combination_type=
strategy, density=density)` for the same inputs, and PEFT's own tensor functions do the combining.
Like every AdapterWeights, the output has its scaling folded into B, so the pool loads it as any adapter.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from peft.utils.merge_utils import dare_linear, dare_ties, task_arithmetic, ties

from mole_serve.lora.kinds.base import TARGET_MODULES, AdapterWeights, check_runnable
from mole_serve.lora.kinds.lora import lora_scaling
from mole_serve.routing.types import DENSITY_STRATEGIES, MERGE_STRATEGIES

# PEFT's pruning strategies: (tensors, per-tensor weights, density) -> combined tensor.
_PRUNING: dict[str, Callable[[list[torch.Tensor], torch.Tensor, float], torch.Tensor]] = {
    "ties": ties,
    "dare_linear": dare_linear,
    "dare_ties": dare_ties,
}


def _combine(strategy: str, tensors: list[torch.Tensor], weights: torch.Tensor, density: float | None) -> torch.Tensor:
    """PEFT's task-arithmetic family: linear, or a pruning strategy at `density`."""
    if strategy == "linear":
        return task_arithmetic(tensors, weights)
    assert density is not None  # _check: the pruning strategies have one
    return _PRUNING[strategy](tensors, weights, density)


def merge_key(
    names: Sequence[str], weights: Sequence[float], strategy: str, density: float | None = None, seed: int = 0
) -> str:
    """A short stable hash of a merge spec. Density and seed count only where the strategy uses
    them, so e.g. two linear specs differing only in seed share one built adapter."""
    spec = {
        "names": list(names),
        "weights": [float(w) for w in weights],
        "strategy": strategy,
        "density": float(density) if strategy in DENSITY_STRATEGIES and density is not None else None,
        "seed": int(seed) if strategy.startswith("dare") else None,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def _check(adapters: Sequence[AdapterWeights], weights: Sequence[float], strategy: str, density: float | None) -> None:
    if strategy not in MERGE_STRATEGIES:
        raise ValueError(f"unknown merge strategy {strategy!r}; expected one of {', '.join(MERGE_STRATEGIES)}")
    if not adapters:
        raise ValueError("a merge needs at least one adapter")
    if len(weights) != len(adapters):
        raise ValueError(f"a merge of {len(adapters)} adapters needs {len(adapters)} weights, got {len(weights)}")
    if not all(math.isfinite(w) for w in weights):
        raise ValueError(f"merge weights must be finite, got {list(weights)}")
    if strategy in DENSITY_STRATEGIES and (density is None or not 0 < density <= 1):
        raise ValueError(f"merge strategy {strategy!r} needs a density in (0, 1], got {density}")
    # PEFT refuses unequal ranks for the task-arithmetic family: A and B are summed elementwise.
    if strategy != "cat" and len(adapters) > 1 and len({a.rank for a in adapters}) > 1:
        ranks = ", ".join(f"{a.name!r}: {a.rank}" for a in adapters)
        raise ValueError(f"merge strategy {strategy!r} needs adapters of equal rank, got {ranks} (use 'cat')")


def merge_adapters(
    adapters: Sequence[AdapterWeights],
    weights: Sequence[float],
    strategy: str,
    name: str,
    density: float | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> AdapterWeights:
    """dtype: what the pool runs the merged factors in; what they compute is checked as any
    adapter's (kinds/base.check_runnable: a merge weight of 1e30 is refused, not run into NaN)."""
    _check(adapters, weights, strategy, density)
    if len(adapters) == 1:
        strategy = "linear"  # as PEFT: a single adapter is always merged linearly
    new_rank = sum(a.rank for a in adapters) if strategy == "cat" else adapters[0].rank
    # PEFT's merged LoraConfig: adapters[0]'s with r = alpha = new_rank, so its own scaling is 1
    # (sqrt(new_rank) when adapters[0] uses rsLoRA), applied on top of the merged A/B below.
    keys = sorted({k for a in adapters for k in a.modules}, key=lambda k: (k[0], TARGET_MODULES.index(k[1])))
    config = {
        **adapters[0].config,
        "r": new_rank,
        "lora_alpha": new_rank,
        "alpha_pattern": {},
        "rank_pattern": {},
        "target_modules": sorted({module for _, module in keys}),
    }
    modules: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
    # DARE prunes with torch.bernoulli on the global CPU RNG: seed a forked copy. PEFT draws module by
    # module in model order (layer, then q k v o gate up down), A list then B list: so does this loop.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for layer, module in keys:
            where = f"layers.{layer}.{module}"
            # Modules an adapter does not target are left out, with its weight (as PEFT).
            As, Bs, ws = [], [], []  # A [r, d_in], unscaled B [d_out, r], weight * scaling
            for adapter, weight in zip(adapters, weights):
                if (layer, module) not in adapter.modules:
                    continue
                A, B = adapter.modules[(layer, module)]
                scaling = lora_scaling(adapter.config, where, A.shape[0])
                if scaling == 0:
                    raise ValueError(f"adapter {adapter.name!r} has lora_alpha 0 at {where}: nothing to merge")
                As.append(A)
                Bs.append(B / scaling)  # undo the folding: PEFT combines the raw B
                ws.append(weight * scaling)
            if strategy == "cat":
                # Stack along rank: A [sum r_i, d_in], B [d_out, sum r_i], so B A = sum_i w_i s_i B_i A_i.
                # PEFT puts w*s on A and zero-pads to the total rank of all adapters.
                A = torch.cat([A * w for A, w in zip(As, ws)])
                B = torch.cat(Bs, dim=1)
                pad = new_rank - A.shape[0]
                A, B = F.pad(A, (0, 0, 0, pad)), F.pad(B, (0, pad))
            else:
                if len({A.shape[0] for A in As}) > 1:
                    raise ValueError(f"merge strategy {strategy!r} needs equal ranks, they differ at {where}")
                # sqrt(|w s|) on each side and the sign on A only, so that B A carries w s.
                wA = torch.tensor([math.copysign(math.sqrt(abs(w)), w) for w in ws])
                wB = torch.tensor([math.sqrt(abs(w)) for w in ws])
                A = _combine(strategy, As, wA, density)
                B = _combine(strategy, Bs, wB, density)
            scaling = lora_scaling(config, where, new_rank)
            B = B * scaling
            check_runnable(name, where, A, B, scaling, dtype)
            modules[(layer, module)] = (A.contiguous(), B.contiguous())
    return AdapterWeights(name=name, rank=new_rank, modules=modules, config=config)
