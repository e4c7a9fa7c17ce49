"""The sub-blocks of a Llama-family decoder layer, run one at a time.

True-sequential GPTQ quantizes q/k/v, then o, then gate/up, then down, each on inputs that already
pass through the quantized Linears before it. Running the layer's sub-blocks separately (rather
than the whole layer once per Linear group) means each Linear is applied to the calibration set
once. `tests/test_quantize_blocks.py` checks that the pieces compose to transformers' own layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from quantize.arch import Architecture


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
    """Runs the pieces of one decoder layer over hidden states [batch, seq, hidden]."""

    def __init__(
        self, arch: Architecture, layer: torch.nn.Module, cos: torch.Tensor, sin: torch.Tensor
    ):
        self.arch = arch
        self.layer = layer
        self.attn = layer.self_attn
        self.mlp = layer.mlp
        self.cos = cos
        self.sin = sin

    def attention_input(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer.input_layernorm(x)

    def attention_core(self, h: torch.Tensor) -> torch.Tensor:
        """Causal self-attention up to (not including) o_proj: the input of o_proj."""
        attn = self.attn
        batch, seq, _ = h.shape
        shape = (batch, seq, -1, attn.head_dim)
        q, k = attn.q_proj(h).view(shape), attn.k_proj(h).view(shape)
        if self.arch.spec.qk_norm is not None:  # Qwen3: per-head RMSNorm before RoPE
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = attn.v_proj(h).view(shape).transpose(1, 2)
        q, k = self.arch.apply_rotary(q, k, self.cos[:, :seq], self.sin[:, :seq])
        out = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=attn.scaling, enable_gqa=k.shape[1] != q.shape[1]
        )
        return out.transpose(1, 2).reshape(batch, seq, -1)

    def attention_output(self, a: torch.Tensor) -> torch.Tensor:
        return self.attn.o_proj(a)

    def mlp_input(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer.post_attention_layernorm(x)

    def mlp_core(self, h: torch.Tensor) -> torch.Tensor:
        """act(gate(h)) * up(h): the input of down_proj."""
        return self.mlp.act_fn(self.mlp.gate_proj(h)) * self.mlp.up_proj(h)

    def mlp_output(self, m: torch.Tensor) -> torch.Tensor:
        return self.mlp.down_proj(m)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention_output(self.attention_core(self.attention_input(x)))
        return x + self.mlp_output(self.mlp_core(self.mlp_input(x)))


def rotary_tables(
    arch: Architecture, config, seqlen: int, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [1, seqlen, head_dim] for positions 0..seqlen-1, from transformers' module."""
    rotary = arch.rotary_cls(config=config).to(device)
    positions = torch.arange(seqlen, device=device).unsqueeze(0)
    probe = torch.zeros(1, seqlen, 1, device=device, dtype=dtype)
    cos, sin = rotary(probe, positions)
    return cos, sin
