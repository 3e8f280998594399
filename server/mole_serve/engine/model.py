"""The decoder forward of the supported base-model families over HF weights: Llama (incl. Llama 3's
rope scaling), Mistral, Qwen2/2.5, Qwen3, Gemma 2, Gemma 3 (text), Phi-3/3.5, SmolLM.

Ours rather than transformers' so the engine owns the KV cache layout and the per-token LoRA
mapping. Tokens of all sequences in a step are flattened to [T, d]; projections that share an
input are fused (q/k/v, gate/up) so the base model and the adapters each run one matmul there.

The families share one forward; what sets one apart is a row of FAMILIES (a `Family`, chosen by
config.model_type): the norm's form, extra norms, q/k norms, the embedding scale, the activation,
the attention scale, soft caps, which layers slide a window, per-layer-type rope. Rope tables come
from the family's own transformers rotary class, so every rope type it knows (llama3, longrope,
yarn, ...) is computed as transformers computes it.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoConfig, PretrainedConfig
from transformers.activations import ACT2FN

from mole_serve.engine.kv_cache import AttentionMetadata, KVCache, LayerAttention
from mole_serve.lora.context import LoRAContext
from mole_serve.lora.kinds.base import FUSED_MODULES, MODULE_GROUPS, LoRATargetSpec


@dataclass(frozen=True)
class Family:
    """What one base-model family does differently in the shared forward (the reference is
    transformers' modeling_<family>.py)."""

    rope_module: str  # transformers.models.<rope_module>.modeling_<rope_module> holds the rotary class
    rope_class: str
    norm_plus_one: bool = False  # RMSNorm scales by (1 + w) in float32 before the cast (Gemma), else w after it
    sandwich_norms: bool = False  # norms on the attention and FFN outputs, pre_feedforward_layernorm before the FFN
    qk_norm: bool = False  # per-head RMSNorm of q and k (q_norm, k_norm over head_dim) before rope
    embed_scale: bool = False  # embeddings times sqrt(hidden), the factor rounded to the activation dtype
    act_field: str = "hidden_act"  # the config field that names the FFN activation
    scale_field: str | None = None  # the config field whose ** -0.5 scales attention logits (None: head_dim)
    attn_softcap: bool = False  # config.attn_logit_softcapping caps the attention logits
    final_softcap: bool = False  # config.final_logit_softcapping caps the output logits
    windows: Literal["none", "all", "layer_types"] = "none"  # where config.sliding_window applies
    rope_per_layer_type: bool = False  # config.rope_parameters holds one rope per layer type
    fused_checkpoint: bool = False  # the checkpoint stores qkv_proj and gate_up_proj fused, in our layout


_GEMMA2 = Family(
    "gemma2",
    "Gemma2RotaryEmbedding",
    norm_plus_one=True,
    sandwich_norms=True,
    embed_scale=True,
    act_field="hidden_activation",
    scale_field="query_pre_attn_scalar",
    attn_softcap=True,
    final_softcap=True,
    windows="layer_types",
)
FAMILIES: dict[str, Family] = {
    "llama": Family("llama", "LlamaRotaryEmbedding"),
    "mistral": Family("mistral", "MistralRotaryEmbedding", windows="all"),
    "qwen2": Family("qwen2", "Qwen2RotaryEmbedding", windows="layer_types"),
    "qwen3": Family("qwen3", "Qwen3RotaryEmbedding", qk_norm=True, windows="layer_types"),
    "gemma2": _GEMMA2,
    # Gemma 3's attention never reads attn_logit_softcapping; sliding layers have a rope of their own.
    "gemma3_text": replace(
        _GEMMA2,
        rope_module="gemma3",
        rope_class="Gemma3RotaryEmbedding",
        attn_softcap=False,
        qk_norm=True,
        rope_per_layer_type=True,
    ),
    "phi3": Family("phi3", "Phi3RotaryEmbedding", windows="all", fused_checkpoint=True),
}
SUPPORTED_MODEL_TYPES = (*FAMILIES, "gemma3")  # gemma3: a multimodal config, served as its text model

# Where the text model's weights sit in a multimodal Gemma 3 checkpoint (transformers 5 and
# older layouts), and where the text model's own checkpoint has them.
_TEXT_PREFIXES = (
    ("model.language_model.", "model."),
    ("language_model.model.", "model."),
    ("language_model.lm_head.", "lm_head."),
)


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
    ffn_norm: torch.Tensor  # [d] before the FFN (Llama's post_attention_layernorm, Gemma's pre_feedforward_layernorm)
    gate_up: Linear  # [2 * I, d]
    down: Linear  # [d, I]
    attention: LayerAttention
    rope: int  # index of the layer's rope table in DecoderModel.ropes
    attn_out_norm: torch.Tensor | None = None  # [d] on the attention output (Gemma's post_attention_layernorm)
    ffn_out_norm: torch.Tensor | None = None  # [d] on the FFN output (Gemma's post_feedforward_layernorm)
    q_norm: torch.Tensor | None = None  # [hd]
    k_norm: torch.Tensor | None = None  # [hd]


@dataclass
class RopeTable:
    """cos and sin per position, [P, rotary_dim] in the activation dtype; with longrope past its
    original length, [2P, rotary_dim]: rows P.. hold the long factors' table."""

    cos: torch.Tensor
    sin: torch.Tensor
    long_after: int | None = None  # longrope: a sequence longer than this uses the long factors


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # In float32 like HF's LlamaRMSNorm, then back to the activation dtype, then the weight.
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rms_norm_plus_one(x: torch.Tensor, weight_plus_one: torch.Tensor, eps: float) -> torch.Tensor:
    # Gemma's RMSNorm: the (1 + w) factor (float32, folded at load) before the cast.
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps) * weight_plus_one).to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, hd]; cos, sin: [T, rd] (HF's rotate_half convention on the first rd <= hd
    features; the rest pass through, as Phi-3's partial rotary)."""
    rd = cos.shape[-1]
    rot = x[..., :rd]
    half = rd // 2
    rotated = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
    out = rot * cos[:, None] + rotated * sin[:, None]
    return out if rd == x.shape[-1] else torch.cat((out, x[..., rd:]), dim=-1)


def family_config(config: PretrainedConfig) -> PretrainedConfig:
    """The config of the decoder we run: a multimodal Gemma 3 config's text_config (named as the
    checkpoint, for the served model's name), else the config itself."""
    if config.model_type != "gemma3":
        return config
    text = config.text_config
    text.name_or_path = config.name_or_path
    return text


def _rope_tables(config: PretrainedConfig, family: Family, key: str | None, positions: int) -> RopeTable:
    """The family's transformers rotary embedding run over positions 0..positions-1 (its forward
    applies the dynamic and longrope updates as HF generation would at that length)."""
    module = importlib.import_module(f"transformers.models.{family.rope_module}.modeling_{family.rope_module}")
    rope = getattr(module, family.rope_class)(config)
    kwargs = {"layer_type": key} if key is not None else {}
    params = config.rope_parameters[key] if key is not None else config.rope_parameters

    def table(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.zeros(1, dtype=torch.float32)  # only its dtype and device are read
        cos, sin = rope(x, torch.arange(n)[None], **kwargs)  # [1, n, rd]
        return cos[0], sin[0]

    original = params.get("original_max_position_embeddings")
    if params.get("rope_type") == "longrope" and original is not None and positions > original:
        # HF picks the short or the long factors by the length of the sequence in the forward
        # call: both tables, short (only its first `original` rows are ever read), then long.
        (short_cos, short_sin), (long_cos, long_sin) = table(original), table(positions)
        pad = positions - original
        cos = torch.cat((F.pad(short_cos, (0, 0, 0, pad)), long_cos))
        sin = torch.cat((F.pad(short_sin, (0, 0, 0, pad)), long_sin))
        return RopeTable(cos, sin, original)
    cos, sin = table(positions)
    return RopeTable(cos, sin)


def _text_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A multimodal Gemma 3 checkpoint's text-model tensors under the text model's own names."""
    out = {}
    for key, tensor in state.items():
        for prefix, plain in _TEXT_PREFIXES:
            if key.startswith(prefix):
                out[plain + key[len(prefix) :]] = tensor
                break
        else:
            out.setdefault(key, tensor)
    return out


class DecoderModel:
    def __init__(
        self, config: PretrainedConfig, state: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype
    ) -> None:
        if config.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model type {config.model_type!r} is not supported ({', '.join(SUPPORTED_MODEL_TYPES)})")
        multimodal = config.model_type == "gemma3"
        if multimodal:
            state = _text_state(state)
        config = family_config(config)
        family = FAMILIES[config.model_type]
        if getattr(config, "use_bidirectional_attention", False):
            raise ValueError(f"{config.model_type} with use_bidirectional_attention is not a causal decoder")
        self.config, self.family, self.device, self.dtype = config, family, device, dtype
        self.num_layers = config.num_hidden_layers
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.hidden_size = config.hidden_size
        self.intermediate_size = config.intermediate_size
        self.eps = config.rms_norm_eps
        self.max_positions = config.max_position_embeddings
        self.hidden_act: str = getattr(config, family.act_field)
        self.act: Callable[[torch.Tensor], torch.Tensor] = ACT2FN[self.hidden_act]
        self.norm: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor] = (
            rms_norm_plus_one if family.norm_plus_one else rms_norm
        )
        # Gemma 3's multimodal model (transformers' class for a gemma3 checkpoint) never caps its logits
        final_softcap = family.final_softcap and not multimodal
        self.final_softcap: float | None = config.final_logit_softcapping if final_softcap else None

        def get(key: str) -> torch.Tensor:
            return state[key].to(device=device, dtype=dtype)

        def norm(key: str) -> torch.Tensor:
            if family.norm_plus_one:  # float32 like HF's (1.0 + self.weight.float())
                return 1.0 + state[key].to(device=device, dtype=torch.float32)
            return get(key)

        def fused(prefix: str, group: str, fused_name: str) -> Linear:
            if family.fused_checkpoint:
                bias = prefix + fused_name + ".bias"
                return Linear(get(prefix + fused_name + ".weight"), get(bias) if bias in state else None)
            names = [prefix + m for m in MODULE_GROUPS[group]]
            has_bias = names[0] + ".bias" in state
            return Linear(
                torch.cat([get(k + ".weight") for k in names]),
                torch.cat([get(k + ".bias") for k in names]) if has_bias else None,
            )

        def linear(key: str) -> Linear:
            return Linear(get(key + ".weight"), get(key + ".bias") if key + ".bias" in state else None)

        self.embed = get("model.embed_tokens.weight")  # [V, d]
        # [] the factor as HF's embed_scale buffer gives it: rounded to the activation dtype
        self.embed_scale = None
        if family.embed_scale:
            self.embed_scale = torch.tensor(self.hidden_size**0.5, dtype=dtype, device=device)
        untied = "lm_head.weight" in state and not getattr(config, "tie_word_embeddings", False)
        self.lm_head = Linear(get("lm_head.weight") if untied else self.embed)
        self.final_norm = norm("model.norm.weight")

        layer_types = getattr(config, "layer_types", None) or ["full_attention"] * self.num_layers
        rope_keys: list[str | None] = [t if family.rope_per_layer_type else None for t in layer_types]
        keys = list(dict.fromkeys(rope_keys))  # the distinct rope tables, in first-use order
        self.ropes = []
        for key in keys:
            table = _rope_tables(config, family, key, self.max_positions)
            self.ropes.append(RopeTable(table.cos.to(device, dtype), table.sin.to(device, dtype), table.long_after))
        scale = (getattr(config, family.scale_field) if family.scale_field else self.head_dim) ** -0.5
        softcap = config.attn_logit_softcapping if family.attn_softcap else None
        self.layers = []
        for i in range(self.num_layers):
            p = f"model.layers.{i}."
            window = None
            if family.windows == "all" or (family.windows == "layer_types" and layer_types[i] == "sliding_attention"):
                window = config.sliding_window
            sandwich = family.sandwich_norms
            ffn_norm = "pre_feedforward_layernorm" if sandwich else "post_attention_layernorm"
            self.layers.append(
                LayerWeights(
                    input_norm=norm(p + "input_layernorm.weight"),
                    qkv=fused(p + "self_attn.", "qkv", "qkv_proj"),
                    o=linear(p + "self_attn.o_proj"),
                    ffn_norm=norm(p + ffn_norm + ".weight"),
                    gate_up=fused(p + "mlp.", "gate_up", "gate_up_proj"),
                    down=linear(p + "mlp.down_proj"),
                    attention=LayerAttention(scale, window, softcap),
                    rope=keys.index(rope_keys[i]),
                    attn_out_norm=norm(p + "post_attention_layernorm.weight") if sandwich else None,
                    ffn_out_norm=norm(p + "post_feedforward_layernorm.weight") if sandwich else None,
                    q_norm=norm(p + "self_attn.q_norm.weight") if family.qk_norm else None,
                    k_norm=norm(p + "self_attn.k_norm.weight") if family.qk_norm else None,
                )
            )

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
            num_layers=self.num_layers,
            shapes=shapes,
            hidden_act=self.hidden_act,
            dtype=self.dtype,
            # PEFT adapters of a fused checkpoint name the fused modules
            fused=dict(FUSED_MODULES) if self.family.fused_checkpoint else {},
        )

    def _rope_rows(self, table: RopeTable, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """[T] the table row of each token: its position; with longrope past the original length,
        P + position (the long factors' row) when the token's sequence is longer than the original
        length (meta.rope_lens, else its chunk's end): HF's choice for a forward call over the
        sequence that far."""
        if table.long_after is None:
            return positions
        lens = meta.rope_lens
        if lens is None:
            lens = positions + 1  # a decode token ends its sequence
            if meta.prefill:
                chunks = [lens.new_full((c.length,), c.start + c.length) for c in meta.prefill]
                lens = torch.cat([lens[: meta.num_decode], *chunks])
        return positions + self.max_positions * (lens > table.long_after).long()

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
        ropes = []
        for table in self.ropes:
            rows = self._rope_rows(table, positions, meta)
            ropes.append((table.cos[rows], table.sin[rows]))  # [T, rd] each
        x = self.embed[input_ids]  # [T, d]
        if self.embed_scale is not None:
            x = x * self.embed_scale
        norm = self.norm
        for i, w in enumerate(self.layers):
            h = norm(x, w.input_norm, self.eps)
            qkv = w.qkv(h)  # [T, (H + 2 kvH) hd]
            if lora is not None:  # the probe group: the gate, if any, sets the layer's weights here
                weights = lora.apply(i, "qkv", h, qkv)
            q, k, v = qkv.split([H * hd, kvH * hd, kvH * hd], dim=-1)
            q, k, v = q.reshape(T, H, hd), k.reshape(T, kvH, hd), v.reshape(T, kvH, hd)
            if w.q_norm is not None and w.k_norm is not None:
                q, k = norm(q, w.q_norm, self.eps), norm(k, w.k_norm, self.eps)
            cos, sin = ropes[w.rope]
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            kv.write(i, k, v, meta)
            attn = kv.attend(i, q, k, v, meta, w.attention)  # [T, H hd]
            o = w.o(attn)
            if lora is not None:
                lora.apply(i, "o", attn, o, weights)
            if w.attn_out_norm is not None:
                o = norm(o, w.attn_out_norm, self.eps)
            x = x + o
            h = norm(x, w.ffn_norm, self.eps)
            gate_up = w.gate_up(h)  # [T, 2 I]
            if lora is not None:
                lora.apply(i, "gate_up", h, gate_up, weights)
            gate, up = gate_up.chunk(2, dim=-1)
            act = self.act(gate) * up
            if lora is not None and lora.experts:  # MixLoRA rows: the mixture of their FFN experts
                lora.mix_ffn(i, h, gate_up, act)
            down = w.down(act)
            if lora is not None:
                lora.apply(i, "down", act, down, weights)
            if w.ffn_out_norm is not None:
                down = norm(down, w.ffn_out_norm, self.eps)
            x = x + down
        h = norm(x[sample_rows], self.final_norm, self.eps)
        logits = self.lm_head(h)
        if self.final_softcap is not None:  # in the activation dtype, as HF
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits.float()
