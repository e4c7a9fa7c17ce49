"""Correctness cases for the Triton kernels, runnable on a GPU or in Triton's CPU interpreter.

Every kernel is compared with a float64 reference computed from the GPTQ definition
W[k, n] = (q[k, n] - zero[g_idx[k], n]) * scale[g_idx[k], n], on fresh random inputs.
`python tests/triton_cases.py [quick]` prints one line per case and exits 1 on any failure; the CPU
test runs it with TRITON_INTERPRET=1 (the interpreter must be chosen before triton is imported).
"""

from __future__ import annotations

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
    add_rmsnorm,
    decode_attention,
    rope_and_cache,
    silu_mul,
)

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

    heads, kv_heads, dim, slots_n, max_len = 6, 2, 64, 4, 300
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * dim, generator=gen)
    pos = torch.tensor([5, 0, 299])
    slots = torch.tensor([2, 0, 3])
    inv = 1.0 / 10000 ** (torch.arange(0, dim, 2) / dim)
    ang = torch.arange(max_len)[:, None] * inv[None]
    ang = torch.cat([ang, ang], -1)
    cos, sin = ang.cos(), ang.sin()
    kc = torch.randn(slots_n, kv_heads, max_len, dim, generator=gen)
    vc = torch.randn(slots_n, kv_heads, max_len, dim, generator=gen)
    kcd, vcd = kc.to(device, dtype), vc.to(device, dtype)
    q = rope_and_cache(
        qkv.to(device, dtype),
        cos.to(device, dtype),
        sin.to(device, dtype),
        pos.to(device),
        slots.to(device),
        kcd,
        vcd,
        heads,
        kv_heads,
    )

    def rot(t, p):
        half = dim // 2
        return t * cos[p] + torch.cat([-t[..., half:], t[..., :half]], -1) * sin[p]

    qr = qkv[:, : heads * dim].view(rows, heads, dim)
    kr = qkv[:, heads * dim : (heads + kv_heads) * dim].view(rows, kv_heads, dim)
    vr = qkv[:, (heads + kv_heads) * dim :].view(rows, kv_heads, dim)
    kc_out, vc_out, q_out = kcd.float().cpu(), vcd.float().cpu(), q.float().cpu()
    for b in range(rows):
        kc[slots[b], :, pos[b]] = rot(kr[b], pos[b])
        vc[slots[b], :, pos[b]] = vr[b]
    err = max(
        (q_out - torch.stack([rot(qr[b], pos[b]) for b in range(rows)])).abs().max().item(),
        (kc_out - kc).abs().max().item(),
        (vc_out - vc).abs().max().item(),
    )
    record("rope_and_cache", err, tol)

    lengths = pos + 1
    for window in (None, 7):
        out = (
            decode_attention(
                q,
                kcd,
                vcd,
                slots.to(device),
                lengths.to(device),
                kv_len=max_len,
                window=window,
                split_len=128,
            )
            .float()
            .cpu()
        )
        worst = 0.0
        for b in range(rows):
            n = int(lengths[b])
            lo = 0 if window is None else max(0, n - window)
            kk = kc[slots[b], :, lo:n].repeat_interleave(heads // kv_heads, 0)
            vv = vc[slots[b], :, lo:n].repeat_interleave(heads // kv_heads, 0)
            ref = F.scaled_dot_product_attention(q_out[b][:, None], kk, vv)[:, 0].reshape(-1)
            worst = max(worst, (out[b] - ref).abs().max().item())
        record(f"attention w={window}", worst, tol)
    return failures


def run(device: str, quick: bool) -> list[str]:
    cases = QUICK_LINEAR if quick else FULL_LINEAR
    rows = (1, 3, 20) if quick else (1, 2, 3, 8, 16, 33, 200)
    return linear_cases(device, cases, rows) + op_cases(device)


if __name__ == "__main__":
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    failed = run(dev, quick="quick" in sys.argv[1:])
    print(f"{len(failed)} failures on {dev}")
    sys.exit(1 if failed else 0)
