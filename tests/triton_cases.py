"""Correctness cases for the Triton kernels, runnable on a GPU or in Triton's CPU interpreter.

Every kernel is compared with a float64 reference computed from the GPTQ definition
W[k, n] = (q[k, n] - zero[g_idx[k], n]) * scale[g_idx[k], n], on fresh random inputs.
`python tests/triton_cases.py [quick]` prints one line per case and exits 1 on any failure; the CPU
test runs it with TRITON_INTERPRET=1 (the interpreter must be chosen before triton is imported).
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.kernels import QuantLinear
from gateway.kernels.packing import pack_cols, pack_rows
from gateway.kernels.triton_gemm import gemm
from gateway.kernels.triton_layout import dequantize_reference, from_layer
from gateway.kernels.triton_ops import (
    DecodeAttentionConfig,
    add_rmsnorm,
    paged_decode_attention,
    paged_prefill_attention,
    rope_and_cache,
    silu_mul,
)
from gateway.model.kv_cache import block_scales, dequantize_kv, quantize_kv

# (in, out, bits, group_size, sym, act_order, bias)
QUICK_LINEAR = [
    (576, 96, 4, 128, True, False, False),  # SmolLM2's 576 with g128: a short last group
    (256, 48, 4, 32, False, True, True),
    (512, 40, 8, 64, False, False, True),
    (320, 32, 4, -1, True, False, False),
]
FULL_LINEAR = [
    *QUICK_LINEAR,
    (1024, 72, 4, 128, True, True, False),
    (4096, 256, 4, 128, True, False, False),
    (1536, 576, 4, 64, False, True, False),
    (768, 200, 8, 128, True, True, True),
    (11008, 64, 4, 128, True, False, False),
]


def make_linear(k, n, bits, gs, sym, act, bias, gen, device):
    """A random GPTQ Linear through the production loader (QuantLinear.from_gptq, which permutes
    act-order rows): its kernel layout, and the float64 weight [k, n] from the definition."""
    eff = gs if gs > 0 else k
    groups = -(-k // eff)
    q = torch.randint(0, 2**bits, (k, n), generator=gen, dtype=torch.int32)
    scales = (torch.rand(groups, n, generator=gen) * 0.02 + 0.001).half()
    if sym:
        zeros = torch.full((groups, n), 2 ** (bits - 1), dtype=torch.int32)
    else:
        zeros = torch.randint(1, 2**bits, (groups, n), generator=gen, dtype=torch.int32)
    order = torch.randperm(k, generator=gen) if act else torch.arange(k)
    g_idx = (order // eff).to(torch.int32)
    b = torch.randn(n, generator=gen).half() if bias else None
    layer = QuantLinear.from_gptq(
        "case",
        qweight=pack_rows(q, bits).to(device),
        qzeros=pack_cols(zeros - 1, bits).to(device),  # v1 stores zero - 1
        scales=scales.to(device),
        g_idx=g_idx.to(device),
        bias=None if b is None else b.to(device),
        bits=bits,
        group_size=gs,
        dtype=torch.float16,
    )
    gi = g_idx.long()
    dense = (q.double() - zeros.double()[gi]) * scales.double()[gi]
    return from_layer(layer), dense, b


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double().cpu() - ref).norm() / ref.norm()).item()


def fragment_outputs(x: torch.Tensor, fw, pipe_splits=(0,)) -> dict[str, torch.Tensor]:
    """Every fragment-layout CUDA kernel and compiled configuration that takes x's rows (mma on
    64-row slices above its bound; the pipelined kernel at each of `pipe_splits`, 0: its own)."""
    from gateway.kernels import cuda_ext, gpu_backend

    m = x.shape[0]
    outs = {"frag_dequant": cuda_ext.frag_dequant_matmul(x, fw)}
    if m <= cuda_ext.MMA_MAX_ROWS:
        for cfg in cuda_ext.MMA_CONFIGS:
            outs[f"mma {cfg}"] = cuda_ext.mma_gemm(x, fw, **cfg)
    else:  # the kernel on row slices
        outs["mma by slices"] = gpu_backend.by_parts(
            x,
            cuda_ext.MMA_MAX_ROWS,
            lambda p, fw=fw: cuda_ext.mma_gemm(p, fw, **cuda_ext.MMA_CONFIGS[0]),
        )
    for cfg in cuda_ext.PIPE_CONFIGS:
        if cuda_ext.pipe_rows(cfg) >= m:
            for splits in pipe_splits:
                outs[f"mma_pipe {cfg} splits={splits}"] = cuda_ext.mma_pipe(
                    x, fw, **cfg, splits=splits
                )
    if m <= cuda_ext.FRAG_GEMV_MAX_ROWS:
        for tiles, steps in ((1, 11), (2, 16)):
            outs[f"frag_gemv {tiles} {steps}"] = cuda_ext.frag_gemv(x, fw, tiles, steps)
    return outs


def linear_cases(device: str, cases, rows) -> list[str]:
    gen = torch.Generator().manual_seed(1234)
    dtype = torch.float16
    failures = []
    for case in cases:
        w, dense, b = make_linear(*case, gen, device)
        if rel_err(dequantize_reference(w).t(), dense) > 1e-6:
            failures.append(f"{case}: layout reference differs from the GPTQ definition")
        for m in rows:
            x = torch.randn(m, case[0], generator=gen).to(dtype)
            ref = x.double() @ dense + (0 if b is None else b.double())
            xd = x.to(device)
            outs = {"gemm": gemm(xd, w, block_m=16, block_n=32, block_k=64)}
            if device == "cuda" and case[0] % 32 == 0:
                from gateway.kernels import cuda_ext

                if m <= 8:
                    for rows_per_warp in (2, 4):
                        outs[f"cuda_gemv_r{rows_per_warp}"] = cuda_ext.gemv(xd, w, rows_per_warp)
                outs["cuda_dequant_mm"] = cuda_ext.dequant_matmul(xd, w)
            if m >= 16:
                outs["gemm_split4"] = gemm(xd, w, block_m=16, block_n=32, block_k=64, split_k=4)
            for name, out in outs.items():
                err = rel_err(out, ref)
                status = "ok" if err < 3e-3 and out.shape == (m, case[1]) else "FAIL"
                line = f"{name:>14} case={case} M={m}: rel err {err:.1e} {status}"
                print(line, flush=True)
                if status != "ok":
                    failures.append(line)
    return failures


def op_cases(device: str) -> list[str]:
    gen = torch.Generator().manual_seed(99)
    dtype = torch.float16 if device == "cuda" else torch.float32
    failures = []

    def record(name: str, err: float, tol: float) -> None:
        line = f"{name:>14}: max abs err {err:.1e} {'ok' if err < tol else 'FAIL'}"
        print(line, flush=True)
        if err >= tol:
            failures.append(line)

    tol = 2e-2 if dtype == torch.float16 else 1e-5
    rows, hidden = 3, 96
    x, r, w = (torch.randn(s, generator=gen) for s in ((rows, hidden), (rows, hidden), (hidden,)))
    out, res = add_rmsnorm(*(t.to(device, dtype) for t in (x, w)), 1e-5, r.to(device, dtype))
    h = x + r
    ref = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5) * w
    record(
        "add_rmsnorm",
        max((out.float().cpu() - ref).abs().max(), (res.float().cpu() - h).abs().max()).item(),
        tol,
    )

    gu = torch.randn(rows, 100, generator=gen)
    record(
        "silu_mul",
        (silu_mul(gu.to(device, dtype)).float().cpu() - F.silu(gu[:, :50]) * gu[:, 50:])
        .abs()
        .max()
        .item(),
        tol,
    )

    for fp8, heads in itertools.product((False, True), ((6, 2), (2, 2))):  # GQA, then MHA
        paged_cases(device, dtype, gen, record, tol, fp8=fp8, heads=heads)
    return failures


def paged_cases(device, dtype, gen, record, tol, *, fp8: bool, heads: tuple[int, int]):
    """RoPE + KV write through a slot mapping, and both attention kernels over a paged cache whose
    block tables are shuffled, against gathers of the same blocks in torch. fp8: the cache holds
    e4m3 values with per (token, head) scales, and the references read them dequantized. heads:
    (query heads, kv heads); one query head per kv head runs the products path on 1-row tiles."""
    (heads, kv_heads), dim, block, num_blocks, max_len = heads, 64, 16, 48, 320
    inv = 1.0 / 10000 ** (torch.arange(0, dim, 2) / dim)
    ang = torch.arange(max_len)[:, None] * inv[None]
    ang = torch.cat([ang, ang], -1)
    cos, sin = ang.cos(), ang.sin()
    kc = torch.randn(num_blocks, block, kv_heads, dim, generator=gen)
    vc = torch.randn(num_blocks, block, kv_heads, dim, generator=gen)
    rows = kc.shape[0] * block
    tag = (" fp8" if fp8 else "") + ("" if heads > kv_heads else " mha")
    if fp8:
        (kq, ks), (vq, vs) = quantize_kv(kc), quantize_kv(vc)
        kc, vc = dequantize_kv(kq, ks, torch.float32), dequantize_kv(vq, vs, torch.float32)
        kcd, vcd = kq.to(device), vq.to(device)
        scales = (block_scales(ks).to(device), block_scales(vs).to(device))
    else:
        kcd, vcd = kc.to(device, dtype), vc.to(device, dtype)
        scales = None
    flat = (kcd.view(rows, kv_heads, dim), vcd.view(rows, kv_heads, dim))

    def read_cache() -> tuple[torch.Tensor, torch.Tensor]:
        if scales is None:
            return kcd.float().cpu(), vcd.float().cpu()
        k_scale, v_scale = (t.cpu().transpose(1, 2) for t in scales)
        k = dequantize_kv(kcd.cpu(), k_scale, torch.float32)
        return k, dequantize_kv(vcd.cpu(), v_scale, torch.float32)

    def rot(t, p):
        half = dim // 2
        return t * cos[p] + torch.cat([-t[..., half:], t[..., :half]], -1) * sin[p]

    tokens = 3
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=gen)
    pos = torch.tensor([5, 0, 299])
    slot_map = torch.tensor([2 * block + 5, 7 * block, 30 * block + 11])
    q = rope_and_cache(
        qkv.to(device, dtype), cos.to(device, dtype), sin.to(device, dtype), pos.to(device),
        slot_map.to(device), *flat, heads, kv_heads, kv_scales=scales,
    )  # fmt: skip
    qkv = qkv.to(dtype).float()  # what the kernel read
    qr = qkv[:, : heads * dim].view(tokens, heads, dim)
    kr = qkv[:, heads * dim : (heads + kv_heads) * dim].view(tokens, kv_heads, dim)
    vr = qkv[:, (heads + kv_heads) * dim :].view(tokens, kv_heads, dim)
    kflat, vflat = kc.view(rows, kv_heads, dim), vc.view(rows, kv_heads, dim)
    for t in range(tokens):
        kflat[slot_map[t]] = rot(kr[t], pos[t])
        vflat[slot_map[t]] = vr[t]
    k_read, v_read = read_cache()
    err = (q.float().cpu() - torch.stack([rot(qr[t], pos[t]) for t in range(tokens)])).abs().max()
    if fp8 and device == "cuda":
        # e4m3 keeps 3 mantissa bits: a stored value is within 1/16 of itself (1e-3 covers the
        # table rounding of fp16 rot). Not in the CPU interpreter: its fp32 -> e4m3 cast does not
        # carry a rounded-up mantissa into the exponent (-124 becomes -64, not -128).
        pairs = ((k_read, kc), (v_read, vc))
        share = max(((got - ref).abs() / (ref.abs() / 16 + 1e-3)).max() for got, ref in pairs)
        record("rope_and_cache fp8 write (error / bound)", share.item(), 1.0)
    if fp8:
        kc, vc = k_read, v_read  # the attention cases read what was stored
    else:
        err = max(err, (k_read - kc).abs().max(), (v_read - vc).abs().max())
    record(f"rope_and_cache paged{tag}", err.item(), tol)

    # Three sequences over shuffled blocks; lengths cross block and split boundaries.
    order = torch.randperm(num_blocks, generator=gen).tolist()
    lengths = [6, 1, 300]
    tables, used = [], 0
    for n in lengths:
        need = -(-n // block)
        tables.append(order[used : used + need])
        used += need
    width = max(len(t) for t in tables)
    table_t = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)

    def keys_of(b, n):
        idx = torch.tensor(tables[b])
        k = kc[idx].reshape(-1, kv_heads, dim)[:n].transpose(0, 1)
        v = vc[idx].reshape(-1, kv_heads, dim)[:n].transpose(0, 1)
        group = heads // kv_heads
        return k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)

    qd = torch.randn(len(lengths), heads, dim, generator=gen)
    # The default launch (tl.dot), and fp32 products (the group is below dot_min_group 4) at two
    # loop widths.
    configs = {
        "": None,
        " products": DecodeAttentionConfig(dot_min_group=4),
        " products l16": DecodeAttentionConfig(block_l=16, num_warps=2, dot_min_group=4),
    }
    for (name, config), window in itertools.product(configs.items(), (None, 7)):
        out = paged_decode_attention(
            qd.to(device, dtype), kcd, vcd, table_t.to(device),
            torch.tensor(lengths, dtype=torch.int32).to(device), kv_len=max_len, window=window,
            split_len=128, kv_scales=scales, config=config,
        ).float().cpu()  # fmt: skip
        worst = 0.0
        for b, n in enumerate(lengths):
            k, v = keys_of(b, n)
            lo = 0 if window is None else max(0, n - window)
            qb = qd[b].to(dtype).float()[:, None]
            ref = F.scaled_dot_product_attention(qb, k[:, lo:], v[:, lo:])[:, 0].reshape(-1)
            worst = max(worst, (out[b] - ref).abs().max().item())
        record(f"paged decode attention{name} w={window}{tag}", worst, tol)

    # Chunks: a whole 6-token prompt, the last token of sequence 1, and 70 tokens of sequence 2
    # after 230 cached ones (two query tiles).
    q_lens = [6, 1, 70]
    starts = [0]
    for n in q_lens:
        starts.append(starts[-1] + n)
    qp = torch.randn(starts[-1], heads, dim, generator=gen)
    for window in (None, 7):
        out = paged_prefill_attention(
            qp.to(device, dtype), kcd, vcd, table_t.to(device),
            torch.tensor(starts, dtype=torch.int32).to(device),
            torch.tensor(lengths, dtype=torch.int32).to(device), max_query_len=max(q_lens),
            window=window, kv_scales=scales,
        ).float().cpu()  # fmt: skip
        worst = 0.0
        for b, n in enumerate(lengths):
            k, v = keys_of(b, n)
            ql = q_lens[b]
            query_pos = torch.arange(n - ql, n)[:, None]
            key_pos = torch.arange(n)[None, :]
            mask = key_pos <= query_pos
            if window is not None:
                mask &= key_pos > query_pos - window
            qb = qp[starts[b] : starts[b + 1]].to(dtype).float().transpose(0, 1)
            ref = F.scaled_dot_product_attention(qb, k, v, attn_mask=mask).transpose(0, 1)
            got = out[starts[b] : starts[b + 1]].view(ql, heads, dim)
            worst = max(worst, (got - ref).abs().max().item())
        record(f"paged prefill attention w={window}{tag}", worst, tol)


def run(device: str, quick: bool) -> list[str]:
    cases = QUICK_LINEAR if quick else FULL_LINEAR
    rows = (1, 3, 20) if quick else (1, 2, 3, 8, 16, 33, 200)
    return linear_cases(device, cases, rows) + op_cases(device)


if __name__ == "__main__":
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    failed = run(dev, quick="quick" in sys.argv[1:])
    print(f"{len(failed)} failures on {dev}")
    sys.exit(1 if failed else 0)
