"""The sub-blocks of a decoder layer (every family shares the Llama block's shape), run one at a
time; where families differ (fused HF Linears, norms around each sub-block, soft-capping), the
spec (quantize/archspec) says which.

True-sequential GPTQ quantizes q/k/v, then o, then gate/up, then down, each on inputs that already
pass through the quantized Linears before it. Running the layer's sub-blocks separately (rather
than the whole layer once per Linear group) means each Linear is applied to the calibration set
once. `tests/test_quantize_blocks.py` checks that the pieces compose to transformers' own layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from quantize.arch import Architecture
from quantize.archspec import Dims, LinearGroup
from quantize.archspec.spec import config_get


class HessianAccumulator:
    """H = 2/n * sum over tokens of x x^T, summed in float64 from float32 chunk products.

    Float64 keeps the sum exact enough over hundreds of thousands of tokens; each chunk's product
    is formed in float32 (fast) from inputs of any dtype. H is symmetric, so only block rows of its
    upper triangle are computed (about 5/8 of the work for wide inputs) and mirrored at the end:
    on a CPU these products cost as much as the layer's forward pass.
    """

    def __init__(self, features: int, device: torch.device) -> None:
        self.features = features
        self.sum = torch.zeros(features, features, dtype=torch.float64, device=device)
        self.count = 0
        n_blocks = 1 if features < 512 else (2 if features < 1024 else 4)
        step = -(-features // n_blocks)
        self._rows = [(r, min(features, r + step)) for r in range(0, features, step)]

    def add(self, x: torch.Tensor) -> None:
        flat = x.reshape(-1, x.shape[-1]).float()
        for r0, r1 in self._rows:
            self.sum[r0:r1, r0:] += (flat[:, r0:r1].t() @ flat[:, r0:]).double()
        self.count += flat.shape[0]

    def hessian(self) -> torch.Tensor:
        if self.count == 0:
            raise RuntimeError("no calibration inputs reached this Linear")
        upper = torch.triu(self.sum)
        full = upper + torch.triu(upper, diagonal=1).t()
        return (full * (2.0 / self.count)).float()


class LayerRunner:
    """Runs the pieces of one decoder layer over hidden states [batch, seq, hidden].

    The Linears of a group run as the spec lists them and their outputs are concatenated, so an
    HF Linear that is already fused (Phi-3's qkv_proj, gate_up_proj) and separate ones (q, k, v)
    give the same q|k|v and gate|up layout."""

    def __init__(
        self, arch: Architecture, layer: torch.nn.Module, cos: torch.Tensor, sin: torch.Tensor
    ):
        from transformers.activations import ACT2FN

        self.arch = arch
        self.layer = layer
        self.attn = layer.self_attn
        self.mlp = layer.mlp
        self.cos = cos
        self.sin = sin
        spec = arch.spec
        config = self.attn.config
        self.dims = Dims.from_config(config)
        self.act_fn = ACT2FN[config_get(config, spec.activation_key, spec.activation)]
        self.softcap = spec.attention.softcap(config)
        norms = spec.norms
        self.norm_attention_in = layer.get_submodule(norms.attention_in.removesuffix(".weight"))
        self.norm_mlp_in = layer.get_submodule(norms.mlp_in.removesuffix(".weight"))
        self.norm_attention_out = self._optional_norm(norms.attention_out)
        self.norm_mlp_out = self._optional_norm(norms.mlp_out)

    def _optional_norm(self, name: str | None) -> torch.nn.Module | None:
        return None if name is None else self.layer.get_submodule(name.removesuffix(".weight"))

    def _group(self, group: LinearGroup, h: torch.Tensor) -> torch.Tensor:
        outs = [self.layer.get_submodule(name)(h) for name in group.names]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)

    def attention_input(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm_attention_in(x)

    def attention_core(self, h: torch.Tensor) -> torch.Tensor:
        """Causal self-attention up to (not including) o_proj: the input of o_proj."""
        attn, dims = self.attn, self.dims
        batch, seq, _ = h.shape
        shape = (batch, seq, -1, dims.head_dim)
        qkv = self._group(self.arch.spec.attention_in, h)
        sizes = [dims.q_size, dims.kv_size, dims.kv_size]
        q, k, v = (t.reshape(shape) for t in qkv.split(sizes, dim=-1))
        if self.arch.spec.qk_norm is not None:  # Qwen3, Gemma 3: per-head RMSNorm before RoPE
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q, k = self.arch.apply_rotary(q, k, self.cos[:, :seq], self.sin[:, :seq])
        if self.softcap is None:
            out = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, scale=attn.scaling, enable_gqa=k.shape[1] != q.shape[1]
            )
        else:
            out = _softcapped_causal_attention(q, k, v, attn.scaling, self.softcap)
        return out.transpose(1, 2).reshape(batch, seq, -1)

    def attention_output(self, a: torch.Tensor) -> torch.Tensor:
        """What the residual stream adds: o_proj's output (Gemma: normed)."""
        out = self.attn.o_proj(a)
        return out if self.norm_attention_out is None else self.norm_attention_out(out)

    def mlp_input(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm_mlp_in(x)

    def mlp_core(self, h: torch.Tensor) -> torch.Tensor:
        """act(gate(h)) * up(h): the input of down_proj."""
        gate, up = self._group(self.arch.spec.mlp_in, h).chunk(2, dim=-1)
        return self.act_fn(gate) * up

    def mlp_output(self, m: torch.Tensor) -> torch.Tensor:
        out = self.mlp.down_proj(m)
        return out if self.norm_mlp_out is None else self.norm_mlp_out(out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention_output(self.attention_core(self.attention_input(x)))
        return x + self.mlp_output(self.mlp_core(self.mlp_input(x)))


def _softcapped_causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, cap: float
) -> torch.Tensor:
    """Causal attention with scores cap * tanh(scores / cap) before the softmax (Gemma 2), which
    SDPA cannot express. q [B, H, T, D], k and v [B, KVH, T, D]."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.tanh(torch.matmul(q, k.transpose(-1, -2)) * scale / cap) * cap
    seq = q.shape[2]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~causal, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v)


def rotary_tables(
    arch: Architecture,
    config,
    seqlen: int,
    device: torch.device,
    dtype: torch.dtype,
    layer_type: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [1, seqlen, head_dim] for positions 0..seqlen-1, from transformers' module;
    of `layer_type` (default: the global layers') where the family has a local rope (Gemma 3)."""
    rotary = arch.rotary_cls(config=config).to(device)
    positions = torch.arange(seqlen, device=device).unsqueeze(0)
    probe = torch.zeros(1, seqlen, 1, device=device, dtype=dtype)
    local = arch.spec.local_rope
    if local is None:
        return rotary(probe, positions)
    return rotary(probe, positions, layer_type or local.global_layer_type)
