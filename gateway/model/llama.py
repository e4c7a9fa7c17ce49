"""The Llama-block runner over a paged KV cache: Llama 2/3, Mistral, Qwen2, Qwen3, SmolLM2, Phi-3,
Gemma 2 and Gemma 3 (text); what differs by family comes from its spec (quantize/archspec).

The engine drives it through one call per step (docs/ARCHITECTURE.md §3 sits on top of it):

    runner = LlamaRunner.load(path, device="cpu", dtype=None, max_model_len=None, kernel="auto",
                              kv_cache_bytes=None, block_size=16, max_num_seqs=256)
    runner.execute([SeqChunk(token_ids, start_pos, block_table, sample), ...])
        -> [chunks with sample=True, vocab] fp32 logits of each such chunk's last token
    runner.forward_logits(input_ids)             -> [B, T, vocab] fp32, no cache (perplexity)

A step's chunks (prompt pieces of several sequences and the decode rows of others) run as one
flat token batch through `_forward`, the one layer loop: prefill, eager decode and the CUDA graphs
of decode-only steps (gateway/model/cuda_graphs.py) all go through it. Which blocks a sequence
uses is the engine's business (gateway/engine/block_manager.py); the runner only checks them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from gateway.kernels import QuantLinear
from gateway.kernels.dispatch import check_kernel_name
from gateway.model.attention import (
    AttendFn,
    Geometry,
    TorchOps,
    TritonOps,
    causal_attention,
    qk_rms_norm,
)
from gateway.model.checkpoint import (
    ModelWeights,
    WeightLoader,
    checkpoint_dir,
    estimate_weight_bytes,
)
from gateway.model.config import ModelConfig, load_model_config
from gateway.model.kv_cache import (
    DEFAULT_BLOCK_SIZE,
    KVCache,
    KVCacheShape,
    available_bytes,
    blocks_for_budget,
    default_budget,
    kv_storage_dtype,
)
from gateway.model.layers import FusedProjection, gelu_tanh_mul, rms_norm
from gateway.model.rope import cos_sin_tables
from gateway.model.step_batch import SeqChunk, StepBatch, build_step_batch
from gateway.model.tensor_source import open_tensors
from quantize.errors import UserInputError

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Gated activations other than SiLU (which each Ops implements): torch ops on every backend.
_ACT_MUL = {"gelu_pytorch_tanh": gelu_tanh_mul}
DEFAULT_MAX_NUM_SEQS = 256


@dataclass(frozen=True)
class RunnerSpec:
    name: str
    model_type: str
    vocab_size: int
    max_model_len: int
    eos_token_ids: tuple[int, ...]
    bos: int | None
    quantization: dict[str, Any] | None
    weight_bytes: int
    kv_pool_bytes: int
    num_blocks: int
    block_size: int
    device: str
    dtype: str
    kv_cache_dtype: str  # what the KV pool stores ("float8_e4m3fn": fp8 with scales)
    kernels: tuple[str, ...]  # the backends QuantLinear layers resolved to ("dense" if none)


def _project(projection: FusedProjection, x: torch.Tensor) -> torch.Tensor:
    """The q|k|v (or gate|up) output as one [T, total] tensor."""
    if projection.is_fused:
        return projection.parts[0](x)
    return torch.cat([part(x) for part in projection.parts], dim=-1)


class LlamaRunner:
    def __init__(
        self,
        config: ModelConfig,
        weights: ModelWeights,
        *,
        device: torch.device,
        dtype: torch.dtype,
        max_model_len: int,
        num_blocks: int,
        block_size: int = DEFAULT_BLOCK_SIZE,
        kv_dtype: torch.dtype | None = None,
    ) -> None:
        self.config = config
        self.weights = weights
        self.device = device
        self.dtype = dtype
        self.max_model_len = max_model_len
        self.block_size = block_size
        self.cache = KVCache(
            KVCacheShape(
                config.num_layers,
                num_blocks,
                block_size,
                config.num_kv_heads,
                config.head_dim,
                dtype if kv_dtype is None else kv_dtype,
            ),
            device,
        )
        # [ropes, max_len, D]: the global rope, then the local layers' own (Gemma 3) if any.
        ropes = [config.rope] + ([config.local_rope] if config.local_rope is not None else [])
        tables = [cos_sin_tables(r, config.head_dim, max_model_len, device, dtype) for r in ropes]
        self.cos = torch.stack([cos for cos, _ in tables])
        self.sin = torch.stack([sin for _, sin in tables])
        self.geometry = Geometry(
            config.num_heads, config.num_kv_heads, config.head_dim, config.sliding_windows,
            scale=config.attention_scale, softcap=config.attention_softcap,
            rope_index=config.layer_ropes,
        )  # fmt: skip
        # Soft-capped attention (Gemma 2) has no Triton kernel: such models run TorchOps on CUDA.
        use_triton = device.type == "cuda" and TritonOps.supports(self.geometry)
        self.ops: TorchOps | TritonOps = TritonOps(max_model_len) if use_triton else TorchOps()
        activation = config.family.activation
        self.act_mul = self.ops.silu_mul if activation == "silu" else _ACT_MUL[activation]
        self.embed_scale = (
            None
            if config.embed_scale is None
            else torch.tensor(config.embed_scale, dtype=dtype, device=device)
        )
        self.graph_decoder = None  # set by load() on CUDA
        self.spec = RunnerSpec(
            name=config.name,
            model_type=config.model_type,
            vocab_size=config.vocab_size,
            max_model_len=max_model_len,
            eos_token_ids=config.eos_token_ids,
            bos=config.bos_token_id,
            quantization=_quant_summary(config),
            weight_bytes=weights.nbytes,
            kv_pool_bytes=self.cache.pool_bytes,
            num_blocks=num_blocks,
            block_size=block_size,
            device=str(device),
            dtype=str(dtype).removeprefix("torch."),
            kv_cache_dtype=str(self.cache.shape.dtype).removeprefix("torch."),
            kernels=_kernel_names(weights),
        )

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def load(
        cls,
        path: str | Path,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype | None = None,
        max_model_len: int | None = None,
        kernel: str = "auto",
        *,
        kv_cache_bytes: int | None = None,
        num_blocks: int | None = None,
        block_size: int = DEFAULT_BLOCK_SIZE,
        max_num_seqs: int = DEFAULT_MAX_NUM_SEQS,
        kv_cache_dtype: str = "auto",
        cuda_graphs: bool = True,
        verify_checksums: bool = True,
    ) -> LlamaRunner:
        """The KV pool holds `num_blocks` blocks if given, else as many as `kv_cache_bytes` (or the
        device default, gateway/model/kv_cache.py) pays for. `max_num_seqs` bounds the CUDA-graph
        batch buckets. `cuda_graphs` (CUDA only): decode-only steps replay graphs captured per
        bucket (gateway/model/cuda_graphs.py); False keeps eager decode (tests, debugging).
        `verify_checksums`: check the tensors against the checksums our writer recorded
        (gateway/model/tensor_source.py); False is `serve --no-verify`."""
        model_dir = checkpoint_dir(path)
        config = load_model_config(model_dir)
        dev = _device(device)
        compute_dtype = _dtype(dtype, dev)
        check_kernel_name(kernel)
        kv_dtype = kv_storage_dtype(kv_cache_dtype, compute_dtype)
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
        for name, value in (("block_size", block_size), ("max_num_seqs", max_num_seqs)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserInputError(f"{name} must be a positive integer, got {value!r}")
        source = open_tensors(model_dir, verify=verify_checksums)
        if dev.type == "cuda":
            _check_weights_fit(estimate_weight_bytes(source, compute_dtype), dev)
        loader = WeightLoader(source, config, device=dev, dtype=compute_dtype, kernel=kernel)
        with torch.inference_mode():
            weights = loader.load()
            _prepare_kernels(weights)
        if num_blocks is None:
            block_bytes = KVCacheShape(
                config.num_layers, 1, block_size, config.num_kv_heads, config.head_dim, kv_dtype
            ).block_bytes
            budget = default_budget(dev) if kv_cache_bytes is None else kv_cache_bytes
            num_blocks = blocks_for_budget(budget, block_bytes)
            if num_blocks < 1:
                raise UserInputError(
                    f"kv_cache_memory: {budget} bytes hold no KV block; one block of "
                    f"{block_size} tokens needs {block_bytes} bytes"
                )
        if not isinstance(num_blocks, int) or isinstance(num_blocks, bool) or num_blocks < 1:
            raise UserInputError(f"num_blocks must be a positive integer, got {num_blocks!r}")
        runner = cls(
            config,
            weights,
            device=dev,
            dtype=compute_dtype,
            max_model_len=max_model_len,
            num_blocks=num_blocks,
            block_size=block_size,
            kv_dtype=kv_dtype,
        )
        if dev.type == "cuda" and cuda_graphs and isinstance(runner.ops, TritonOps):
            from gateway.model.cuda_graphs import CudaGraphDecoder

            runner.graph_decoder = CudaGraphDecoder(runner, max_num_seqs)
            runner.graph_decoder.capture_all()
        return runner

    # ---- the engine's API ---------------------------------------------------------------------

    @torch.inference_mode()
    def execute(self, chunks: Sequence[SeqChunk]) -> torch.Tensor:
        """Compute every chunk's tokens (writing their KV at their blocks) in one forward pass;
        returns [number of chunks with sample=True, vocab] fp32 logits, in chunk order."""
        self._check_chunks(chunks)
        graphs = self.graph_decoder
        if (
            graphs is not None
            and len(chunks) <= graphs.buckets[-1]
            and all(len(c.token_ids) == 1 and c.sample for c in chunks)
        ):
            return graphs.decode(chunks)
        batch = build_step_batch(chunks, self.block_size, self.device)
        return self.forward_step(batch)

    def forward_step(self, batch: StepBatch, *, static_kv_len: bool = False) -> torch.Tensor:
        """The step as pure tensor code over `batch` (what a CUDA graph captures)."""
        if isinstance(self.ops, TritonOps):
            attend = self.ops.paged_attention(
                self.geometry, self.cache, batch, self.cos, self.sin, static_kv_len=static_kv_len
            )
        else:
            attend = self.ops.paged_attention(self.geometry, self.cache, batch, self.cos, self.sin)
        return self._forward(self._embed(batch.input_ids), attend, batch.logits_rows)

    @torch.inference_mode()
    def forward_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits [B, T, vocab] fp32 of every position, causal, without touching the cache."""
        if input_ids.dim() != 2 or input_ids.dtype != torch.int64 or input_ids.shape[1] == 0:
            raise ValueError(
                "input_ids must be int64 [B, T] with T >= 1, got "
                f"{input_ids.dtype} {list(input_ids.shape)}"
            )
        batch_size, length = input_ids.shape
        if length > self.max_model_len:
            raise ValueError(
                f"sequence of {length} tokens is longer than max_model_len {self.max_model_len}"
            )
        if input_ids.device.type == "cpu":
            self._check_tokens(input_ids.view(-1).tolist())
        attend = causal_attention(
            self.geometry, batch_size, length, self.cos[:, :length], self.sin[:, :length],
            fp8_kv=self.cache.shape.scaled,
        )  # fmt: skip
        hidden = self._embed(input_ids.to(self.device).view(-1))
        return self._forward(hidden, attend, None).view(batch_size, length, -1)

    # ---- the model ----------------------------------------------------------------------------

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        hidden = F.embedding(ids, self.weights.embed)
        # Gemma: times sqrt(hidden), rounded to the activation dtype as transformers does.
        return hidden if self.embed_scale is None else hidden * self.embed_scale

    def _forward(
        self, hidden: torch.Tensor, attend: AttendFn, logits_rows: torch.Tensor | None
    ) -> torch.Tensor:
        """The layer loop over flat tokens [T, hidden]; logits of `logits_rows` (None: all)."""
        ops, eps = self.ops, self.config.rms_norm_eps
        residual: torch.Tensor | None = None
        for i, layer in enumerate(self.weights.layers):
            x, residual = ops.add_rmsnorm(hidden, layer.input_norm, eps, residual)
            qkv = _project(layer.qkv, x)
            if layer.q_norm is not None:  # Qwen3, Gemma 3: per-head RMSNorm of q and k, pre-RoPE
                qkv = qk_rms_norm(self.geometry, qkv, layer.q_norm, layer.k_norm, eps)
            hidden = layer.o_proj(attend(i, qkv))
            if layer.attention_out_norm is not None:  # Gemma: normed before the residual add
                hidden = rms_norm(hidden, layer.attention_out_norm, eps)
            x, residual = ops.add_rmsnorm(hidden, layer.mlp_norm, eps, residual)
            hidden = layer.down_proj(self.act_mul(_project(layer.gate_up, x)))
            if layer.mlp_out_norm is not None:
                hidden = rms_norm(hidden, layer.mlp_out_norm, eps)
        if logits_rows is not None:
            if logits_rows.numel() == 0:  # a step of prompt chunks that sample nothing
                return hidden.new_empty((0, self.config.vocab_size), dtype=torch.float32)
            hidden, residual = hidden[logits_rows], residual[logits_rows]
        x, _ = ops.add_rmsnorm(hidden, self.weights.final_norm, eps, residual)
        logits = self.weights.lm_head(x).float()
        cap = self.config.final_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap

    # ---- input checks (bad input is an error, never a device-side assert) ----------------------

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

    def _check_chunks(self, chunks: Sequence[SeqChunk]) -> None:
        if not chunks:
            raise ValueError("a step needs at least one chunk")
        num_blocks = self.cache.shape.num_blocks
        for chunk in chunks:
            self._check_tokens(chunk.token_ids)
            start = chunk.start_pos
            if not isinstance(start, int) or isinstance(start, bool) or start < 0:
                raise ValueError(f"start_pos must be a non-negative integer, got {start!r}")
            end = start + len(chunk.token_ids)
            if end > self.max_model_len:
                raise ValueError(
                    f"a chunk of {len(chunk.token_ids)} tokens from position {start} ends at "
                    f"{end}, past max_model_len {self.max_model_len}"
                )
            table = chunk.block_table
            if len(table) * self.block_size < end:
                raise ValueError(
                    f"block table of {len(table)} blocks covers {len(table) * self.block_size} "
                    f"positions, the chunk ends at {end}"
                )
            if table and (min(table) < 0 or max(table) >= num_blocks):
                raise ValueError(f"block ids must lie in [0, {num_blocks}), got {list(table)}")


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
        # How it was quantized, as quantize_config.json says (None: absent or not of the type).
        "damp_percent": _raw_value(quant.raw, "damp_percent", (int, float)),
        "true_sequential": _raw_value(quant.raw, "true_sequential", bool),
        "static_groups": _raw_value(quant.raw, "static_groups", bool),
    }


def _raw_value(raw: dict[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    value = raw.get(key)
    if isinstance(value, bool) and kind is not bool:
        return None
    return value if isinstance(value, kind) else None


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
