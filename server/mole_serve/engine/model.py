"""The decoder forward of the Llama family (Llama, Mistral, Qwen2, SmolLM) over HF weights.

Ours rather than transformers' so the engine owns the KV cache layout and the per-token LoRA
mapping. Tokens of all sequences in a step are flattened to [T, d]; projections that share an
input are fused (q/k/v, gate/up) so the base model and the adapters each run one matmul there.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoConfig, PretrainedConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from mole_serve.engine.kv_cache import AttentionMetadata, KVCache
from mole_serve.lora.context import LoRAContext
from mole_serve.lora.kinds.base import MODULE_GROUPS, LoRATargetSpec

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


def _onednn_packed_gemm_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class Linear:
    """y = x @ W^T + b, with W laid out once for the fastest GEMM of the device.

    On CPU, oneDNN's pre-packed weights (the layout torch.compile's CPU freezing uses) run the
    projections and the LM head faster than F.linear's transposed operand, at decode and prefill
    sizes alike (`python -m bench.gemm`; docs/benchmarks.md). The packing is for any M, in fp32 math.
    Elsewhere, and under autograd (oneDNN's op has none), F.linear."""

    PACK_ROWS = 32  # oneDNN's packing hint: the decode batch size we tune for

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        self.weight, self.bias = weight, bias  # weight: [d_out, d_in]
        self.packed = None
        if (
            weight.device.type == "cpu"
            and weight.dtype in (torch.float32, torch.bfloat16)
            and _onednn_packed_gemm_available()
        ):
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, self.PACK_ROWS)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None and not (torch.is_grad_enabled() and x.requires_grad):
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


@dataclass
class LayerWeights:
    input_norm: torch.Tensor  # [d]
    qkv: Linear  # [(H + 2*kvH) * hd, d]
    o: Linear  # [d, H * hd]
    post_norm: torch.Tensor  # [d]
    gate_up: Linear  # [2 * I, d]
    down: Linear  # [d, I]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # In float32 like HF's LlamaRMSNorm, then back to the activation dtype.
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, hd]; cos, sin: [T, hd] (HF's rotate_half convention)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


class DecoderModel:
    def __init__(
        self, config: PretrainedConfig, state: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype
    ) -> None:
        if config.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model type {config.model_type!r} is not supported ({', '.join(SUPPORTED_MODEL_TYPES)})")
        self.config, self.device, self.dtype = config, device, dtype
        self.num_layers = config.num_hidden_layers
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.hidden_size = config.hidden_size
        self.intermediate_size = config.intermediate_size
        self.eps = config.rms_norm_eps
        self.max_positions = config.max_position_embeddings

        def get(key: str) -> torch.Tensor:
            return state[key].to(device=device, dtype=dtype)

        self.embed = get("model.embed_tokens.weight")  # [V, d]
        self.lm_head = Linear(get("lm_head.weight") if "lm_head.weight" in state else self.embed)  # tied or not
        self.final_norm = get("model.norm.weight")
        self.layers = []
        for i in range(self.num_layers):
            p = f"model.layers.{i}."
            attn = [p + f"self_attn.{m}" for m in MODULE_GROUPS["qkv"]]
            has_bias = attn[0] + ".bias" in state
            self.layers.append(
                LayerWeights(
                    input_norm=get(p + "input_layernorm.weight"),
                    qkv=Linear(
                        torch.cat([get(k + ".weight") for k in attn]),
                        torch.cat([get(k + ".bias") for k in attn]) if has_bias else None,
                    ),
                    o=Linear(get(p + "self_attn.o_proj.weight")),
                    post_norm=get(p + "post_attention_layernorm.weight"),
                    gate_up=Linear(torch.cat([get(p + f"mlp.{m}.weight") for m in MODULE_GROUPS["gate_up"]])),
                    down=Linear(get(p + "mlp.down_proj.weight")),
                )
            )
        rope = LlamaRotaryEmbedding(config)  # type: ignore[arg-type]  # reads the rope fields mistral/qwen2 share
        positions = torch.arange(self.max_positions, dtype=torch.float32)
        freqs = positions[:, None] * rope.inv_freq[None, :].float()
        emb = torch.cat((freqs, freqs), dim=-1)  # [max_positions, hd]
        self.cos = (emb.cos() * rope.attention_scaling).to(device=device, dtype=dtype)
        self.sin = (emb.sin() * rope.attention_scaling).to(device=device, dtype=dtype)

    @classmethod
    def from_pretrained(cls, path: Path, device: torch.device, dtype: torch.dtype) -> DecoderModel:
        path = Path(path)
        config = AutoConfig.from_pretrained(path)
        index = path / "model.safetensors.index.json"
        files = (
            sorted(set(json.loads(index.read_text())["weight_map"].values()))
            if index.exists()
            else ["model.safetensors"]
        )
        state: dict[str, torch.Tensor] = {}
        for f in files:
            state.update(load_file(path / f))
        return cls(config, state, device, dtype)

    def lora_spec(self) -> LoRATargetSpec:
        d, q, kv, inter = (
            self.hidden_size,
            self.num_heads * self.head_dim,
            self.num_kv_heads * self.head_dim,
            self.intermediate_size,
        )
        shapes = {
            "q_proj": (d, q),
            "k_proj": (d, kv),
            "v_proj": (d, kv),
            "o_proj": (q, d),
            "gate_proj": (d, inter),
            "up_proj": (d, inter),
            "down_proj": (inter, d),
        }
        return LoRATargetSpec(
            num_layers=self.num_layers, shapes=shapes, hidden_act=self.config.hidden_act, dtype=self.dtype
        )

    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        kv: KVCache,
        meta: AttentionMetadata,
        sample_rows: torch.Tensor,  # [N] rows of T whose logits are needed
        lora: LoRAContext | None = None,
    ) -> torch.Tensor:
        """Returns float32 logits [N, V] for the sampled rows."""
        H, kvH, hd = self.num_heads, self.num_kv_heads, self.head_dim
        T = input_ids.shape[0]
        cos, sin = self.cos[positions], self.sin[positions]  # [T, hd]
        x = self.embed[input_ids]  # [T, d]
        for i, w in enumerate(self.layers):
            h = rms_norm(x, w.input_norm, self.eps)
            qkv = w.qkv(h)  # [T, (H + 2 kvH) hd]
            if lora is not None:  # the probe group: the gate, if any, sets the layer's weights here
                weights = lora.apply(i, "qkv", h, qkv)
            q, k, v = qkv.split([H * hd, kvH * hd, kvH * hd], dim=-1)
            q = apply_rope(q.view(T, H, hd), cos, sin)
            k = apply_rope(k.view(T, kvH, hd), cos, sin)
            v = v.view(T, kvH, hd)
            kv.write(i, k, v, meta)
            attn = kv.attend(i, q, k, v, meta)  # [T, H hd]
            o = w.o(attn)
            if lora is not None:
                lora.apply(i, "o", attn, o, weights)
            x = x + o
            h = rms_norm(x, w.post_norm, self.eps)
            gate_up = w.gate_up(h)  # [T, 2 I]
            if lora is not None:
                lora.apply(i, "gate_up", h, gate_up, weights)
            gate, up = gate_up.chunk(2, dim=-1)
            act = F.silu(gate) * up
            if lora is not None and lora.experts:  # MixLoRA rows: the mixture of their FFN experts
                lora.mix_ffn(i, h, gate_up, act)
            down = w.down(act)
            if lora is not None:
                lora.apply(i, "down", act, down, weights)
            x = x + down
        h = rms_norm(x[sample_rows], self.final_norm, self.eps)
        return self.lm_head(h).float()
