"""The layer-by-layer driver: calibration activations in, quantized Linears out, layer by layer.

Only one decoder layer's weights are on the device at any time. The calibration hidden states
[nsamples, seqlen, hidden] stay on the device and are overwritten in place by each quantized
layer's output, which becomes the next layer's input.

True-sequential order, with each Linear applied to the calibration set once:
  1. norm1(x)                        -> Hessian of q/k/v      -> quantize q, k, v (fused)
  2. attention(norm1(x)) with new qkv -> Hessian of o_proj     -> quantize o
  3. x += o(attn); norm2(x)           -> Hessian of gate/up    -> quantize gate, up (fused)
  4. act(gate) * up with new gate/up  -> Hessian of down_proj  -> quantize down
  5. x += down(mlp)                   -> the next layer's input
With `quantize_lm_head` (GPTQModel's `lm_head=True`) the last layer's output goes on through the
final norm, whose output is the lm_head's input: its Hessian is hidden x hidden, so the logits
(vocab x tokens) are never formed.
Steps 2 and 4 keep their outputs for steps 3 and 5 when memory allows (always worth it on a CPU,
where compute is scarce); otherwise steps 3 and 5 recompute them (cheap on a GPU).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from quantize.arch import (
    EMBED_NAME,
    FINAL_NORM_NAME,
    LM_HEAD_NAME,
    LM_HEAD_PREFIX,
    Architecture,
    build_decoder_layer,
    resolve_architecture,
    sliding_window_limit,
)
from quantize.archspec import resolve_family
from quantize.blocks import HessianAccumulator, LayerRunner, rotary_tables
from quantize.errors import UserInputError
from quantize.gptq import GPTQOptions, QuantizationResult, gptq_quantize, rtn_quantize
from quantize.grid import QuantSpec
from quantize.qtensor import QuantizedWeight
from quantize.source import ModelSource

METHODS = ("gptq", "rtn")


@dataclass(frozen=True)
class QuantizeSettings:
    spec: QuantSpec = field(default_factory=QuantSpec)
    gptq: GPTQOptions = field(default_factory=GPTQOptions)
    method: str = "gptq"
    true_sequential: bool = True
    device: str = "cpu"
    # Calibration tokens pushed through a sub-block at once (bounds the temporaries).
    chunk_tokens: int | None = None
    # Keep attention/MLP intermediates between steps: None decides by device and size.
    cache_activations: bool | None = None
    # Quantize the (untied) lm_head too, with the blocks' grid; GPTQModel's `lm_head=True`.
    quantize_lm_head: bool = False

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")


@dataclass
class LinearReport:
    name: str
    out_features: int
    in_features: int
    rel_error: float  # ||(W - Q) X||^2 / ||W X||^2 on the calibration inputs (NaN for RTN)
    seconds: float
    damp: float


@dataclass
class LayerReport:
    index: int
    seconds: float
    linears: list[LinearReport]
    stage_seconds: dict[str, float]

    @property
    def mean_rel_error(self) -> float:
        return sum(lin.rel_error for lin in self.linears) / max(1, len(self.linears))


@dataclass
class LayerResult:
    """What the checkpoint writer needs from one finished layer."""

    index: int
    quantized: dict[str, QuantizedWeight]  # relative Linear name -> integers, on CPU
    other: dict[str, torch.Tensor]  # norms and biases, relative names, on CPU
    report: LayerReport


@dataclass
class HeadResult:
    """The quantized lm_head, yielded after the last layer when `quantize_lm_head` is set."""

    quantized: QuantizedWeight  # on CPU
    report: LinearReport


# Vocab rows of the lm_head quantized at once: GPTQ keeps about five float32 copies of the rows it
# works on, so 16384 rows of a 4096-wide head cost ~1.3 GB however large the vocabulary.
HEAD_ROWS_PER_CHUNK = 16384


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserInputError("--device cuda: no CUDA device is available (use cpu or auto)")
    if name not in ("cpu", "cuda"):
        raise UserInputError(f"--device must be auto, cuda or cpu, got {name!r}")
    return torch.device(name)


def compute_dtype(device: torch.device) -> torch.dtype:
    # fp16/bf16 matmuls are orders of magnitude slower than fp32 on CPUs; GPUs run fp16.
    return torch.float16 if device.type == "cuda" else torch.float32


def _linear_shapes(config, lm_head: bool = False) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of each quantized Linear of one layer (and the head), as the
    family's spec declares them."""
    family = resolve_family(config)
    shapes = family.linear_shapes(config)
    if lm_head:
        shapes[family.lm_head] = (int(config.vocab_size), int(config.hidden_size))
    return shapes


def check_packable(config, spec: QuantSpec, lm_head: bool = False) -> None:
    """Refuse shapes AutoGPTQ's layout cannot hold before any work is done."""
    for name, (out_f, in_f) in _linear_shapes(config, lm_head).items():
        for what, size in (("in_features", in_f), ("out_features", out_f)):
            if size * spec.bits % 32:
                fix = "other --bits" + (" or no --quantize-lm-head" if lm_head else "")
                raise UserInputError(
                    f"{name} has {what}={size}, and {size} x {spec.bits} bits is not a multiple "
                    f"of 32: AutoGPTQ's int32 packing cannot hold it; choose {fix}"
                )


def group_size_warnings(config, spec: QuantSpec, lm_head: bool = False) -> list[str]:
    """Why other tools may refuse the checkpoint: in_features that the group size does not divide.

    The format holds a short last group (ours, GPTQModel and transformers' torch backend read it),
    but vLLM's GPTQ kernels need in_features % group_size == 0, and transformers' auto-picked
    kernel refuses it too.
    """
    if spec.group_size == -1:
        return []
    odd = {
        name: in_f
        for name, (_, in_f) in _linear_shapes(config, lm_head).items()
        if in_f % spec.group_size
    }
    if not odd:
        return []
    listed = ", ".join(f"{name} ({in_f})" for name, in_f in odd.items())
    return [
        f"--group-size {spec.group_size} does not divide in_features of {listed}: the last group "
        "of each row is shorter. gptq-gateway, GPTQModel and transformers with "
        'GPTQConfig(backend="torch") load it; vLLM refuses it (its GPTQ kernels need in_features '
        "to be a multiple of the group size), and transformers' default kernel may too. For "
        "vLLM pick a --group-size that divides every in_features (or -1)"
    ]


class _Layer:
    """One decoder layer on the device while it is being quantized."""

    def __init__(self, runner: LayerRunner, settings: QuantizeSettings, device: torch.device):
        self.runner = runner
        self.layer = runner.layer
        self.settings = settings
        self.device = device
        self.quantized: dict[str, QuantizedWeight] = {}
        self.linears: list[LinearReport] = []

    def module(self, name: str) -> torch.nn.Linear:
        return self.layer.get_submodule(name)

    def quantize_group(self, names: tuple[str, ...], hessian: torch.Tensor | None) -> None:
        """Quantize Linears sharing one input as a single fused matrix, then put Q in place."""
        modules = [self.module(n) for n in names]
        weights = [m.weight.detach().float() for m in modules]
        fused = torch.cat(weights, dim=0)
        start = time.perf_counter()
        if self.settings.method == "rtn":
            result: QuantizationResult = rtn_quantize(fused, self.settings.spec, hessian)
        else:
            assert hessian is not None
            result = gptq_quantize(fused, hessian, self.settings.spec, self.settings.gptq)
        seconds = time.perf_counter() - start
        sizes = [w.shape[0] for w in weights]
        parts = result.quantized.split_rows(sizes)
        deq = result.weight.split(sizes, dim=0)
        row = 0
        for name, module, w, q, dq in zip(names, modules, weights, parts, deq, strict=True):
            module.weight.data = dq.to(module.weight.dtype).contiguous()
            self.quantized[name] = q.to("cpu")
            rel = result.rel_error(slice(row, row + w.shape[0]))
            row += w.shape[0]
            self.linears.append(
                LinearReport(
                    name=name,
                    out_features=w.shape[0],
                    in_features=w.shape[1],
                    rel_error=rel,
                    seconds=seconds * w.shape[0] / fused.shape[0],
                    damp=result.damp,
                )
            )


def _drain(acc: HessianAccumulator) -> torch.Tensor:
    """The finished Hessian; the float64 sum is freed before GPTQ needs the memory."""
    hessian = acc.hessian()
    acc.sum = torch.empty(0)
    return hessian


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(i, min(n, i + size)) for i in range(0, n, size)]


def _quantize_layer_sequential(
    lay: _Layer,
    x: torch.Tensor,
    chunks: list[slice],
    cache: bool,
    need_output: bool,
    stage: Callable[[str], None],
) -> None:
    r = lay.runner
    hidden = x.shape[-1]
    qkv, o_proj, gate_up, down = (g.names for g in r.arch.spec.groups)

    stage("qkv")
    acc = HessianAccumulator(hidden, x.device)
    for c in chunks:
        acc.add(r.attention_input(x[c]))
    lay.quantize_group(qkv, _drain(acc))

    stage("o")
    attn_cache = [] if cache else None
    o_in = r.attn.o_proj.in_features
    acc = HessianAccumulator(o_in, x.device)
    for c in chunks:
        a = r.attention_core(r.attention_input(x[c]))
        acc.add(a)
        if attn_cache is not None:
            attn_cache.append(a)
    lay.quantize_group(o_proj, _drain(acc))

    stage("gate_up")
    acc = HessianAccumulator(hidden, x.device)
    for k, c in enumerate(chunks):
        if attn_cache is not None:
            a = attn_cache[k]
            attn_cache[k] = None  # free as we go
        else:
            a = r.attention_core(r.attention_input(x[c]))
        x[c] += r.attention_output(a)
        acc.add(r.mlp_input(x[c]))
    del attn_cache
    lay.quantize_group(gate_up, _drain(acc))

    stage("down")
    mlp_cache = [] if cache and need_output else None
    acc = HessianAccumulator(r.mlp.down_proj.in_features, x.device)
    for c in chunks:
        m = r.mlp_core(r.mlp_input(x[c]))
        acc.add(m)
        if mlp_cache is not None:
            mlp_cache.append(m)
    lay.quantize_group(down, _drain(acc))

    if need_output:
        stage("output")
        for k, c in enumerate(chunks):
            if mlp_cache is not None:
                m = mlp_cache[k]
                mlp_cache[k] = None
            else:
                m = r.mlp_core(r.mlp_input(x[c]))
            x[c] += r.mlp_output(m)


def _quantize_layer_at_once(
    lay: _Layer,
    x: torch.Tensor,
    chunks: list[slice],
    need_output: bool,
    stage: Callable[[str], None],
) -> None:
    """Not true-sequential: every Linear sees the unquantized layer's inputs."""
    r = lay.runner
    stage("hessians")
    hidden = x.shape[-1]
    qkv, o_proj, gate_up, down = (g.names for g in r.arch.spec.groups)
    accs = {
        qkv: HessianAccumulator(hidden, x.device),
        o_proj: HessianAccumulator(r.attn.o_proj.in_features, x.device),
        gate_up: HessianAccumulator(hidden, x.device),
        down: HessianAccumulator(r.mlp.down_proj.in_features, x.device),
    }
    for c in chunks:
        h = r.attention_input(x[c])
        accs[qkv].add(h)
        a = r.attention_core(h)
        accs[o_proj].add(a)
        x2 = x[c] + r.attention_output(a)
        h2 = r.mlp_input(x2)
        accs[gate_up].add(h2)
        accs[down].add(r.mlp_core(h2))
    for names, acc in accs.items():
        stage(names[0].split(".")[-1])
        lay.quantize_group(names, _drain(acc))
    if need_output:
        stage("output")
        for c in chunks:
            x[c] = r.forward(x[c])


def _rtn_layer(lay: _Layer) -> None:
    for group in lay.runner.arch.spec.groups:
        lay.quantize_group(group.names, None)


class Quantizer:
    """Quantizes a model source layer by layer; `run` yields each finished layer, then the
    HeadResult of the lm_head when `quantize_lm_head` is set."""

    def __init__(self, source: ModelSource, settings: QuantizeSettings) -> None:
        self.source = source
        self.settings = settings
        self.config = source.config
        self.arch: Architecture = resolve_architecture(self.config)
        if settings.quantize_lm_head and source.tied_embeddings():
            raise UserInputError(
                "--quantize-lm-head: this model ties its lm_head to the input embedding "
                "(tie_word_embeddings), so the head IS the embedding matrix; quantizing it would "
                "mean storing a second, quantized copy beside the fp16 embedding (more bytes, "
                "not fewer). Drop --quantize-lm-head for tied models"
            )
        check_packable(self.config, settings.spec, lm_head=settings.quantize_lm_head)
        self.device = resolve_device(settings.device)
        self.dtype = compute_dtype(self.device)
        self.num_layers = int(self.config.num_hidden_layers)

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        embed = self.source.tensor(EMBED_NAME).to(self.device, self.dtype)
        hidden = F.embedding(ids.to(self.device), embed)
        scale = self.arch.spec.embedding_scale(self.config)
        # Gemma scales the embeddings, by a factor rounded to the activation dtype.
        if scale is None:
            return hidden
        return hidden * torch.tensor(scale, dtype=self.dtype, device=self.device)

    def _rope_layer_type(self, index: int) -> str | None:
        """The layer's rope table key: its layer type where the family has a local rope."""
        return None if self.arch.spec.local_rope is None else self.config.layer_types[index]

    def _cache_activations(self, x: torch.Tensor) -> bool:
        if self.settings.cache_activations is not None:
            return self.settings.cache_activations
        if self.device.type != "cpu":
            return False
        # attention output (hidden) + MLP intermediate: allow up to 8 GiB of host memory.
        inter = int(self.config.intermediate_size)
        per_token = (x.shape[-1] + inter) * x.element_size()
        return x.shape[0] * x.shape[1] * per_token <= 8 << 30

    def run(
        self,
        calib_ids: torch.Tensor | None,
        on_stage: Callable[[int, str], None] | None = None,
    ) -> Iterator[LayerResult | HeadResult]:
        settings = self.settings
        if settings.method == "gptq":
            if calib_ids is None or calib_ids.dim() != 2:
                raise ValueError("GPTQ needs calibration token ids [nsamples, seqlen]")
            window = sliding_window_limit(self.config)
            if window is not None and calib_ids.shape[1] > window:
                raise UserInputError(
                    f"--seqlen {calib_ids.shape[1]} exceeds the model's sliding window of "
                    f"{window} tokens; use --seqlen {window} or less"
                )
        x = None
        rope_tables: dict[str | None, tuple[torch.Tensor, torch.Tensor]] = {}
        chunks: list[slice] = []
        cache = False
        if settings.method == "gptq":
            nsamples, seqlen = calib_ids.shape
            with torch.inference_mode():
                x = self._embed(calib_ids)
                for layer_type in {self._rope_layer_type(i) for i in range(self.num_layers)}:
                    rope_tables[layer_type] = rotary_tables(
                        self.arch, self.config, seqlen, self.device, self.dtype, layer_type
                    )
            default_tokens = 16384 if self.device.type == "cuda" else 8192
            per_chunk = max(1, (settings.chunk_tokens or default_tokens) // seqlen)
            chunks = _chunks(nsamples, per_chunk)
            cache = self._cache_activations(x)

        for index in range(self.num_layers):
            start = time.perf_counter()
            stage_seconds: dict[str, float] = {}
            last = [None, start]

            def stage(name: str, index: int = index, marks: list = last, seconds=stage_seconds):
                now = time.perf_counter()
                if marks[0] is not None:
                    seconds[marks[0]] = seconds.get(marks[0], 0.0) + now - marks[1]
                marks[0], marks[1] = name, now
                if on_stage is not None:
                    on_stage(index, name)

            stage("load")
            tensors = self.source.layer_tensors(index)
            layer = build_decoder_layer(
                self.arch, self.config, index, tensors, self.device, self.dtype
            )
            cos, sin = rope_tables.get(self._rope_layer_type(index), (None, None))
            lay = _Layer(LayerRunner(self.arch, layer, cos, sin), settings, self.device)
            # The last layer's output is needed only as the input of a GPTQ-quantized lm_head.
            need_output = index < self.num_layers - 1 or (
                x is not None and settings.quantize_lm_head
            )
            with torch.inference_mode():
                if settings.method == "rtn":
                    _rtn_layer(lay)
                elif settings.true_sequential:
                    _quantize_layer_sequential(lay, x, chunks, cache, need_output, stage)
                else:
                    _quantize_layer_at_once(lay, x, chunks, need_output, stage)
            stage("done")
            quantized_weights = {f"{n}.weight" for n in self.arch.spec.linear_names}
            other = {k: v for k, v in tensors.items() if k not in quantized_weights}
            del layer, lay.layer, lay.runner
            report = LayerReport(
                index=index,
                seconds=time.perf_counter() - start,
                linears=lay.linears,
                stage_seconds={k: v for k, v in stage_seconds.items() if k != "done"},
            )
            yield LayerResult(index=index, quantized=lay.quantized, other=other, report=report)

        if settings.quantize_lm_head:
            if on_stage is not None:
                on_stage(self.num_layers, "lm_head")
            with torch.inference_mode():
                head = self._quantize_head(x, chunks)
            del x
            yield head

    def _head_hessian(self, x: torch.Tensor, chunks: list[slice]) -> torch.Tensor:
        """The lm_head's input is the final norm of the last (quantized) layer's output."""
        hidden = x.shape[-1]
        norm = self.arch.norm_cls(hidden, eps=float(self.config.rms_norm_eps))
        norm.weight.data = self.source.tensor(FINAL_NORM_NAME).to(self.device, self.dtype)
        acc = HessianAccumulator(hidden, x.device)
        for c in chunks:
            acc.add(norm(x[c]))
        return _drain(acc)

    def _quantize_head(self, x: torch.Tensor | None, chunks: list[slice]) -> HeadResult:
        """GPTQ (or RTN) of the lm_head in blocks of vocab rows, all on one Hessian.

        Rows are independent given the Hessian (as for fused q/k/v), so the blocks' integers
        join into exactly what one call over the whole head would give, with bounded memory.
        """
        start = time.perf_counter()
        hessian = None if x is None else self._head_hessian(x, chunks)
        weight = self.source.tensor(LM_HEAD_NAME)
        parts: list[QuantizedWeight] = []
        row_error = row_energy = 0.0
        damp = 0.0
        for r0 in range(0, weight.shape[0], HEAD_ROWS_PER_CHUNK):
            rows = weight[r0 : r0 + HEAD_ROWS_PER_CHUNK].to(self.device, torch.float32)
            if self.settings.method == "rtn":
                result = rtn_quantize(rows, self.settings.spec, hessian)
            else:
                assert hessian is not None
                result = gptq_quantize(rows, hessian, self.settings.spec, self.settings.gptq)
            parts.append(result.quantized.to("cpu"))
            if result.row_error is not None and result.row_energy is not None:
                row_error += float(result.row_error.sum())
                row_energy += float(result.row_energy.sum())
            damp = result.damp
            del rows, result
        if hessian is None:
            rel_error = float("nan")
        else:
            rel_error = row_error / row_energy if row_energy > 0 else 0.0
        report = LinearReport(
            name=LM_HEAD_PREFIX,
            out_features=int(weight.shape[0]),
            in_features=int(weight.shape[1]),
            rel_error=rel_error,
            seconds=time.perf_counter() - start,
            damp=damp,
        )
        return HeadResult(quantized=QuantizedWeight.cat_rows(parts), report=report)
