"""The Llama-family runner (Llama 2/3, Mistral, Qwen2, SmolLM2) over a static KV cache.

The engine drives it through five calls (docs/ARCHITECTURE.md §3 sits on top of these):

    runner = LlamaRunner.load(path, device="cpu", dtype=None, num_slots=8, max_model_len=None,
                              kernel="auto")
    runner.prefill(slot, token_ids, start_pos=0) -> [vocab] fp32 logits of the last token
    runner.decode(slots, tokens, positions)      -> [B, vocab] fp32 logits
    runner.forward_logits(input_ids)             -> [B, T, vocab] fp32, no cache (perplexity)
    runner.free(slot)

`decode` validates and moves its inputs, then calls `_decode_step`, which is pure tensor code over
static buffers (no host syncs, no data-dependent Python branches, shapes fixed by B and the static
`kv_len`), so the GPU path can capture it in a CUDA graph per batch-size bucket.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from gateway.kernels import QuantLinear
from gateway.kernels.dispatch import check_kernel_name
from gateway.model.checkpoint import (
    ModelWeights,
    WeightLoader,
    checkpoint_dir,
    estimate_weight_bytes,
)
from gateway.model.config import ModelConfig, load_model_config
from gateway.model.kv_cache import KVCache, KVCacheShape, available_bytes
from gateway.model.layers import rms_norm
from gateway.model.rope import apply_rope, cos_sin_tables
from gateway.model.tensor_source import open_tensors
from quantize.errors import UserInputError

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# (layer index, q [B,H,T,D], k [B,KVH,T,D], v [B,KVH,T,D]) -> attention output [B,H,T,D]
AttendFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class RunnerSpec:
    name: str
    model_type: str
    vocab_size: int
    max_model_len: int
    num_slots: int
    eos_token_ids: tuple[int, ...]
    bos: int | None
    quantization: dict[str, Any] | None
    weight_bytes: int
    kv_pool_bytes: int
    device: str
    dtype: str
    kernels: tuple[str, ...]  # the backends QuantLinear layers resolved to ("dense" if none)


class LlamaRunner:
    def __init__(
        self,
        config: ModelConfig,
        weights: ModelWeights,
        *,
        device: torch.device,
        dtype: torch.dtype,
        num_slots: int,
        max_model_len: int,
    ) -> None:
        self.config = config
        self.weights = weights
        self.device = device
        self.dtype = dtype
        self.num_slots = num_slots
        self.max_model_len = max_model_len
        self.cache = KVCache(
            KVCacheShape(
                config.num_layers,
                num_slots,
                config.num_kv_heads,
                max_model_len,
                config.head_dim,
                dtype,
            ),
            device,
        )
        self.cos, self.sin = cos_sin_tables(
            config.rope, config.head_dim, max_model_len, device, dtype
        )
        self.key_positions = torch.arange(max_model_len, device=device)
        self.windows = sorted(set(config.sliding_windows), key=lambda w: -1 if w is None else w)
        self.gqa = config.num_heads != config.num_kv_heads
        self.graph_decoder = None  # set by load() on CUDA
        self.spec = RunnerSpec(
            name=config.name,
            model_type=config.model_type,
            vocab_size=config.vocab_size,
            max_model_len=max_model_len,
            num_slots=num_slots,
            eos_token_ids=config.eos_token_ids,
            bos=config.bos_token_id,
            quantization=_quant_summary(config),
            weight_bytes=weights.nbytes,
            kv_pool_bytes=self.cache.pool_bytes,
            device=str(device),
            dtype=str(dtype).removeprefix("torch."),
            kernels=_kernel_names(weights),
        )

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def load(
        cls,
        path: str | Path,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype | None = None,
        num_slots: int = 8,
        max_model_len: int | None = None,
        kernel: str = "auto",
        cuda_graphs: bool = True,
    ) -> LlamaRunner:
        """`cuda_graphs` (CUDA only): decode through fused kernels captured per batch bucket
        (gateway/model/cuda_graphs.py); False keeps the eager `_decode_step` (tests, debugging)."""
        model_dir = checkpoint_dir(path)
        config = load_model_config(model_dir)
        dev = _device(device)
        compute_dtype = _dtype(dtype, dev)
        check_kernel_name(kernel)
        if not isinstance(num_slots, int) or isinstance(num_slots, bool) or num_slots < 1:
            raise UserInputError(f"num_slots must be a positive integer, got {num_slots!r}")
        if max_model_len is None:
            max_model_len = config.max_position_embeddings
        if (
            not isinstance(max_model_len, int)
            or isinstance(max_model_len, bool)
            or not 1 <= max_model_len <= config.max_position_embeddings
        ):
            raise UserInputError(
                f"max_model_len must be an integer in [1, {config.max_position_embeddings}] "
                f"(the model's max_position_embeddings), got {max_model_len!r}"
            )
        source = open_tensors(model_dir)
        if dev.type == "cuda":
            _check_weights_fit(estimate_weight_bytes(source, compute_dtype), dev)
        loader = WeightLoader(source, config, device=dev, dtype=compute_dtype, kernel=kernel)
        with torch.inference_mode():
            weights = loader.load()
            _prepare_kernels(weights)
        runner = cls(
            config,
            weights,
            device=dev,
            dtype=compute_dtype,
            num_slots=num_slots,
            max_model_len=max_model_len,
        )
        if dev.type == "cuda" and cuda_graphs:
            from gateway.model.cuda_graphs import CudaGraphDecoder

            if CudaGraphDecoder.supports(config):
                runner.graph_decoder = CudaGraphDecoder(runner)
                runner.graph_decoder.capture_all()
        return runner

    # ---- the engine's API ---------------------------------------------------------------------

    @torch.inference_mode()
    def prefill(self, slot: int, token_ids: Sequence[int], start_pos: int = 0) -> torch.Tensor:
        """Run `token_ids` at positions start_pos.. of `slot`, writing their KV; returns the
        logits [vocab] fp32 of the last one."""
        self._check_slot(slot)
        ids = self._check_tokens(token_ids)
        if not isinstance(start_pos, int) or start_pos < 0:
            raise ValueError(f"start_pos must be a non-negative integer, got {start_pos!r}")
        end = start_pos + len(ids)
        if end > self.max_model_len:
            raise ValueError(
                f"prefill of {len(ids)} tokens from position {start_pos} ends at {end}, past "
                f"max_model_len {self.max_model_len}"
            )
        tokens = torch.tensor(ids, dtype=torch.int64, device=self.device)
        cos, sin = self.cos[start_pos:end], self.sin[start_pos:end]
        masks = self._prefix_masks(start_pos, end)
        k_cache, v_cache = self.cache.k, self.cache.v

        def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            k_cache[i, slot, :, start_pos:end] = k[0]
            v_cache[i, slot, :, start_pos:end] = v[0]
            if start_pos:
                k, v = k_cache[i, slot, None, :, :end], v_cache[i, slot, None, :, :end]
            mask = masks[self.config.sliding_windows[i]]
            return self._sdpa(q, k, v, mask)

        hidden = self._run_layers(F.embedding(tokens, self.weights.embed)[None], cos, sin, attend)
        return self._logits(hidden[0, -1])

    @torch.inference_mode()
    def decode(
        self, slots: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        """One token for each of B sequences: row b is token `tokens[b]` at `positions[b]` of slot
        `slots[b]`, attending to that slot's positions 0..positions[b]. Returns [B, vocab] fp32."""
        self._check_decode_inputs(slots, tokens, positions)
        if self.device.type == "cpu":
            return self._decode_rows(slots, tokens, positions)
        if self.graph_decoder is not None:
            return self.graph_decoder.decode(slots, tokens, positions)
        kv_len = self.max_model_len
        if positions.device.type == "cpu":
            # Read only the filled part of the cache. A captured graph passes a fixed kv_len (the
            # bucket) to _decode_step instead.
            kv_len = int(positions.max()) + 1
        to_dev = {"device": self.device, "dtype": torch.int64, "non_blocking": True}
        return self._decode_step(
            slots.to(**to_dev), tokens.to(**to_dev), positions.to(**to_dev), kv_len
        )

    def _decode_rows(
        self, slots: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        """CPU decode: each row attends to a view of its own slot's filled cache, so nothing is
        gathered or masked (on a busy 2-core machine every extra parallel op costs milliseconds)."""
        rows = list(zip(slots.tolist(), positions.tolist(), strict=True))
        cos, sin = self.cos[positions][:, None, None, :], self.sin[positions][:, None, None, :]
        k_cache, v_cache = self.cache.k, self.cache.v

        def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            window = self.config.sliding_windows[i]
            outs = []
            for b, (slot, pos) in enumerate(rows):
                k_cache[i, slot, :, pos] = k[b, :, 0]
                v_cache[i, slot, :, pos] = v[b, :, 0]
                start = 0 if window is None else max(0, pos + 1 - window)
                keys = k_cache[i, slot, None, :, start : pos + 1]
                values = v_cache[i, slot, None, :, start : pos + 1]
                outs.append(self._sdpa(q[b : b + 1], keys, values, None))
            return outs[0] if len(outs) == 1 else torch.cat(outs)

        hidden = self._run_layers(
            F.embedding(tokens, self.weights.embed)[:, None], cos, sin, attend
        )
        return self._logits(hidden[:, 0])

    def _decode_step(
        self, slots: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor, kv_len: int
    ) -> torch.Tensor:
        """Graph-capturable decode: inputs are device int64 [B]; every position < kv_len."""
        keys = self.key_positions[:kv_len]
        before = keys[None, :] <= positions[:, None]  # [B, kv_len]
        masks = {
            window: (
                before if window is None else before & (keys[None, :] > positions[:, None] - window)
            )[:, None, None, :]
            for window in self.windows
        }
        cos, sin = self.cos[positions][:, None, None, :], self.sin[positions][:, None, None, :]
        k_cache, v_cache = self.cache.k, self.cache.v

        def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            k_cache[i][slots, :, positions] = k[:, :, 0]
            v_cache[i][slots, :, positions] = v[:, :, 0]
            keys_i, values_i = k_cache[i][slots, :, :kv_len], v_cache[i][slots, :, :kv_len]
            return self._sdpa(q, keys_i, values_i, masks[self.config.sliding_windows[i]])

        hidden = self._run_layers(
            F.embedding(tokens, self.weights.embed)[:, None], cos, sin, attend
        )
        return self._logits(hidden[:, 0])

    @torch.inference_mode()
    def forward_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits [B, T, vocab] fp32 of every position, causal, without touching the cache."""
        if input_ids.dim() != 2 or input_ids.dtype != torch.int64 or input_ids.shape[1] == 0:
            raise ValueError(
                "input_ids must be int64 [B, T] with T >= 1, got "
                f"{input_ids.dtype} {list(input_ids.shape)}"
            )
        length = input_ids.shape[1]
        if length > self.max_model_len:
            raise ValueError(
                f"sequence of {length} tokens is longer than max_model_len {self.max_model_len}"
            )
        if input_ids.device.type == "cpu":
            self._check_tokens(input_ids.view(-1).tolist())
        masks = self._prefix_masks(0, length)

        def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return self._sdpa(q, k, v, masks[self.config.sliding_windows[i]])

        ids = input_ids.to(self.device)
        hidden = self._run_layers(
            F.embedding(ids, self.weights.embed), self.cos[:length], self.sin[:length], attend
        )
        return self._logits(hidden)

    def free(self, slot: int) -> None:
        """Nothing to release: a slot's stale KV is never read past the positions rewritten next."""
        self._check_slot(slot)

    # ---- the model ----------------------------------------------------------------------------

    def _run_layers(
        self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend: AttendFn
    ) -> torch.Tensor:
        cfg = self.config
        batch, length = hidden.shape[:2]
        heads, kv_heads, head_dim, eps = (
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
            cfg.rms_norm_eps,
        )
        for i, layer in enumerate(self.weights.layers):
            x = rms_norm(hidden, layer.input_norm, eps)
            q, k, v = layer.qkv(x)
            q = apply_rope(q.view(batch, length, heads, head_dim).transpose(1, 2), cos, sin)
            k = apply_rope(k.view(batch, length, kv_heads, head_dim).transpose(1, 2), cos, sin)
            v = v.view(batch, length, kv_heads, head_dim).transpose(1, 2)
            attn = attend(i, q, k, v)
            hidden = hidden + layer.o_proj(
                attn.transpose(1, 2).reshape(batch, length, heads * head_dim)
            )
            x = rms_norm(hidden, layer.post_attention_norm, eps)
            gate, up = layer.gate_up(x)
            hidden = hidden + layer.down_proj(F.silu(gate) * up)
        return hidden

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.weights.lm_head(
            rms_norm(hidden, self.weights.final_norm, self.config.rms_norm_eps)
        ).float()

    def _sdpa(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        causal = mask is None and q.shape[2] > 1
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=self.gqa
        )

    def _prefix_masks(self, start: int, end: int) -> dict[int | None, torch.Tensor | None]:
        """Per sliding window: the bool mask [T, end] of queries start..end-1 over keys 0..end-1,
        or None where plain causal attention from position 0 is exact (SDPA's is_causal)."""
        masks: dict[int | None, torch.Tensor | None] = {}
        query = torch.arange(start, end, device=self.device)[:, None]
        keys = self.key_positions[:end][None, :]
        for window in self.windows:
            if start == 0 and (window is None or window >= end):
                masks[window] = None
                continue
            mask = keys <= query
            if window is not None:
                mask &= keys > query - window
            masks[window] = mask
        return masks

    # ---- input checks (bad input is an error, never a device-side assert) ----------------------

    def _check_slot(self, slot: int) -> None:
        if not isinstance(slot, int) or isinstance(slot, bool) or not 0 <= slot < self.num_slots:
            raise ValueError(f"slot must be an integer in [0, {self.num_slots}), got {slot!r}")

    def _check_tokens(self, token_ids: Sequence[int]) -> list[int]:
        ids = [int(t) for t in token_ids]
        if not ids:
            raise ValueError("token_ids is empty")
        low, high = min(ids), max(ids)
        if low < 0 or high >= self.config.vocab_size:
            raise ValueError(
                f"token ids must lie in [0, {self.config.vocab_size}), "
                f"got values in [{low}, {high}]"
            )
        return ids

    def _check_decode_inputs(
        self, slots: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor
    ) -> int:
        named = {"slots": slots, "tokens": tokens, "positions": positions}
        for name, value in named.items():
            if (
                not isinstance(value, torch.Tensor)
                or value.dim() != 1
                or value.dtype != torch.int64
            ):
                raise ValueError(f"{name} must be a 1-D int64 tensor")
        batch = slots.shape[0]
        if batch == 0 or tokens.shape[0] != batch or positions.shape[0] != batch:
            raise ValueError(
                f"slots, tokens and positions must have the same non-zero length, got "
                f"{slots.shape[0]}, {tokens.shape[0]}, {positions.shape[0]}"
            )
        if all(v.device.type == "cpu" for v in named.values()):
            limits = {
                "slots": self.num_slots,
                "tokens": self.config.vocab_size,
                "positions": self.max_model_len,
            }
            for name, value in named.items():
                if int(value.min()) < 0 or int(value.max()) >= limits[name]:
                    raise ValueError(
                        f"{name} must lie in [0, {limits[name]}), got {value.tolist()}"
                    )
            if torch.unique(slots).numel() != batch:
                raise ValueError(
                    f"slots must be distinct within a decode batch, got {slots.tolist()}"
                )
        return batch


def _prepare_kernels(weights: ModelWeights) -> None:
    from gateway.kernels.dispatch import prepare

    for module in _quant_layers(weights):
        prepare(module)


def _quant_layers(weights: ModelWeights) -> list[QuantLinear]:
    found = []
    for layer in weights.layers:
        for part in (layer.qkv, layer.o_proj, layer.gate_up, layer.down_proj):
            found.extend(m for m in part.modules() if isinstance(m, QuantLinear))
    found.extend(m for m in weights.lm_head.modules() if isinstance(m, QuantLinear))
    return found


def _kernel_names(weights: ModelWeights) -> tuple[str, ...]:
    names = {m.backend.name for m in _quant_layers(weights) if m.backend is not None}
    return tuple(sorted(names)) or ("dense",)


def _quant_summary(config: ModelConfig) -> dict[str, Any] | None:
    quant = config.quant
    if quant is None:
        return None
    return {
        "quant_method": "gptq",
        "bits": quant.bits,
        "group_size": quant.group_size,
        "desc_act": quant.desc_act,
        "sym": quant.sym,
        "checkpoint_format": quant.checkpoint_format,
    }


def _device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise UserInputError(
            f"device: {device!r} is not a device name (use 'cpu' or 'cuda')"
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserInputError("device: 'cuda' was asked for but torch sees no CUDA GPU")
    if dev.type not in ("cpu", "cuda"):
        raise UserInputError(f"device: {dev.type!r} is not supported (use 'cpu' or 'cuda')")
    return dev


def _dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        # fp16/bf16 matmuls on CPU are far slower than fp32; fp16 on GPU halves the bytes read.
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        if dtype.removeprefix("torch.") not in _DTYPES:
            raise UserInputError(f"dtype: {dtype!r} is not one of {', '.join(_DTYPES)}")
        return _DTYPES[dtype.removeprefix("torch.")]
    if dtype not in _DTYPES.values():
        raise UserInputError(f"dtype: {dtype} is not one of {', '.join(_DTYPES)}")
    return dtype


def _check_weights_fit(need: int, device: torch.device) -> None:
    free = available_bytes(device)
    if free is not None and need > free:
        raise UserInputError(
            f"weights do not fit on {device}: they need {need / 2**30:.2f} GiB ({need} bytes), "
            f"{free / 2**30:.2f} GiB ({free} bytes) free"
        )
