#!/usr/bin/env python3
"""moekit's kernels next to what a PyTorch user would otherwise run, on the shapes of
`shared/reference/performance.md` that the C ABI covers, in one process on the same inputs.

Ours: `python/moekit` (ctypes over `libmoekit_capi.so`) on torch CUDA tensors, on the current
stream. Theirs (plain eager PyTorch):
- gating: DeepSeek-V3's reference routing (sigmoid, + bias for the choice, group score = sum
  of the group's top 2, keep the top-k groups, top-k, gather the unbiased scores, renormalise,
  scale), Qwen3-MoE's (softmax, top-k, renormalise);
- dispatch: a stable argsort of the ids, `index_select` of the tokens (FP8: then the 1x128
  quantisation in torch ops); ours: layout + permute. Both start from the ids;
- combine: `index_add_` in f32 of the weighted rows (in the argsort order), then BF16;
- BF16 grouped GEMM: `torch._grouped_mm` (a per-group matmul loop where it is absent or
  refuses a shape); masked: `torch.bmm`; k-grouped: a per-group matmul loop;
- FP8 grouped GEMM: dequantise both operands to BF16, then the same BF16 peer.

Each shape is checked first (ours against theirs, a tolerance argued at each check; a
failure exits 1), then timed with CUDA events (warm-up, median of --reps; memory-bound
inputs rotate through copies larger than twice the L2). The table: shape, ours and theirs in
us, theirs / ours, and each side's fraction of the ceiling (minimum bytes / time against
4.3 TB/s; FLOPs / time against 790 TFLOPS BF16 measured, 1979 TFLOPS FP8 datasheet). The
times are what eager Python sees, launch overheads of each side included.

Usage: python3 benches/torch_side_by_side.py [--only NAME] [--reps N] [--out FILE]
       python3 benches/torch_side_by_side.py --cpu-smoke   # tiny shapes, CPU path, no timing
The library is $MOEKIT_LIB or the repository's target/{release,debug} (see python/moekit).
"""

import argparse
import datetime
import math
import pathlib
import statistics
import sys
import time
import traceback

import numpy as np
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "python"))
import moekit  # noqa: E402

HBM, BF16_RATE, FP8_RATE = 4.3e12, 790e12, 1979e12
FP8 = torch.float8_e4m3fn


class CheckFailed(Exception):
    pass


def check(ok, what):
    if not ok:
        raise CheckFailed(what)


# ---- inputs ------------------------------------------------------------------------------------

def synthetic_logits(tokens, experts=256):
    """The synthetic logits of the Rust benches (`v3_ids`, `v3_group_sizes`): same ids, same groups."""
    i = np.arange(tokens * experts, dtype=np.uint64)
    u = ((i * np.uint64(2246822519)) & np.uint64(0xFFFFFFFF)) >> np.uint64(9)
    return torch.from_numpy((u.astype(np.float64) / 4194304.0 - 1.0).astype(np.float32).reshape(tokens, experts))


def v3_ids(tokens, dev):
    """Top-8 ids of a DeepSeek-V3 routing (no bias) of the synthetic logits."""
    ids, _ = moekit.route(synthetic_logits(tokens).to(dev), 8, score="sigmoid", n_groups=8, topk_groups=4,
                          renormalize=True, route_scale=2.5)
    return ids


def smoke_ids(t, e, k, dev):
    """k distinct experts per token, as a router gives."""
    return torch.argsort(torch.rand(t, e, device=dev), dim=-1)[:, :k].to(torch.int32).contiguous()


def pow2_quant(x, br, bc):
    """FP8 E4M3 codes of ``x [..., R, C]`` with one power-of-two scale per br x bc block
    (scales ``[..., R/br, C/bc]`` f32). Power-of-two scales make every dequantised value exact
    in BF16 (4 significant bits times 2^e), so theirs sees exactly the values ours does."""
    *lead, r, c = x.shape
    blocks = x.float().reshape(*lead, r // br, br, c // bc, bc)
    amax = blocks.abs().amax(dim=(-3, -1), keepdim=True).clamp_min(1e-30)
    scale = torch.exp2(torch.ceil(torch.log2(amax / 448.0)))
    codes = (blocks / scale).clamp(-448, 448).to(FP8).reshape(x.shape)
    return codes, scale.reshape(*lead, r // br, c // bc).contiguous()


def dequant(codes, scales, br, bc):
    *lead, r, c = codes.shape
    v = codes.float().reshape(*lead, r // br, br, c // bc, bc) * scales.reshape(*lead, r // br, 1, c // bc, 1)
    return v.reshape(codes.shape).to(torch.bfloat16)


# ---- theirs --------------------------------------------------------------------------------------

def torch_route_v3(logits, bias, k=8, n_groups=8, topk_groups=4, route_scale=2.5):
    scores = logits.sigmoid()
    t = scores.shape[0]
    choice = (scores + bias).view(t, n_groups, -1)
    group_score = choice.topk(2, dim=-1)[0].sum(dim=-1)
    kept = group_score.topk(topk_groups, dim=-1)[1]
    dropped = torch.ones(t, n_groups, dtype=torch.bool, device=logits.device).scatter_(1, kept, False)
    ids = choice.masked_fill(dropped.unsqueeze(-1), float("-inf")).flatten(1).topk(k, dim=-1)[1]
    w = scores.gather(1, ids)
    return ids, w / w.sum(dim=-1, keepdim=True) * route_scale


def torch_route_qwen3(logits, k=8):
    w, ids = logits.softmax(dim=-1).topk(k, dim=-1)
    return ids, w / w.sum(dim=-1, keepdim=True)


def torch_quant_1x128(x):
    """1x128 FP8 quantisation with f32 scales amax / 448 (the rule of moekit's f32 scales)."""
    r, h = x.shape
    blocks = x.float().view(r, h // 128, 128)
    scale = blocks.abs().amax(dim=-1, keepdim=True).clamp_min(1e-4) / 448.0
    return (blocks / scale).clamp(-448, 448).to(FP8).view(r, h), scale.view(r, h // 128)


def torch_dispatch(x, ids, fp8):
    order = torch.argsort(ids.flatten(), stable=True)
    rows = x.index_select(0, order // ids.shape[1])
    return torch_quant_1x128(rows) if fp8 else rows


def torch_combine(y_sorted, token, w_sorted, tokens):
    out = torch.zeros(tokens, y_sorted.shape[1], dtype=torch.float32, device=y_sorted.device)
    return out.index_add_(0, token, y_sorted.float() * w_sorted[:, None]).to(torch.bfloat16)


_GROUPED_MM = {"ok": hasattr(torch, "_grouped_mm")}


def grouped_mm(a, b, sizes):
    """``a [M, K]`` rows in groups of ``sizes`` times ``b [G, N, K]``^T: torch._grouped_mm, or a
    per-group matmul loop where it is absent or refuses (recorded in the peer's name)."""
    if _GROUPED_MM["ok"]:
        offs = torch.tensor(np.cumsum(sizes), dtype=torch.int32, device=a.device)
        try:
            return torch._grouped_mm(a, b.transpose(-2, -1), offs=offs)
        except (RuntimeError, NotImplementedError) as e:
            print(f"torch._grouped_mm refused ({str(e).splitlines()[0]}); per-group matmul loop instead")
            _GROUPED_MM["ok"] = False
    return torch.cat([p @ b[g].T for g, p in enumerate(a.split(list(sizes)))])


def grouped_name():
    return "torch._grouped_mm" if _GROUPED_MM["ok"] else "matmul loop"


# ---- timing ------------------------------------------------------------------------------------

def median_us(fn, warmup, reps, cuda):
    """Median of `reps` timed calls of ``fn(i)`` after `warmup` (CUDA events on the current stream;
    on the CPU a wall clock, exercised by --cpu-smoke but never reported)."""
    for i in range(warmup):
        fn(i)
    times = []
    for i in range(reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(i)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3)
        else:
            t0 = time.perf_counter()
            fn(i)
            times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)


def rotation(make, nbytes, dev):
    """Copies of an input, together larger than twice the L2 (memory-bound ops), one otherwise."""
    if dev.type != "cuda":
        return [make()]
    l2 = getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 60 << 20)
    return [make() for _ in range(min(64, max(1, math.ceil(2 * l2 / nbytes))))]


# ---- cases -------------------------------------------------------------------------------------
# Each returns (ours(i), theirs(i), work, ceiling, note): work in bytes (memory-bound) or FLOPs.

def case_gate(dev, smoke, tokens, experts, v3):
    t = 64 if smoke else tokens
    gen = torch.Generator(device=dev).manual_seed(1)
    logits = rotation(lambda: torch.randn(t, experts, device=dev, generator=gen), t * experts * 4, dev)
    bias = 0.05 * torch.randn(experts, device=dev, generator=gen)
    if v3:
        cfg = dict(score="sigmoid", n_groups=8, topk_groups=4, renormalize=True, route_scale=2.5)
        ours = lambda i: moekit.route(logits[i % len(logits)], 8, bias=bias, **cfg)  # noqa: E731
        theirs = lambda i: torch_route_v3(logits[i % len(logits)], bias)  # noqa: E731
        choice = (logits[0].double().sigmoid() + bias.double())
    else:
        ours = lambda i: moekit.route(logits[i % len(logits)], 8, score="softmax", renormalize=True)  # noqa: E731
        theirs = lambda i: torch_route_qwen3(logits[i % len(logits)])  # noqa: E731
        choice = logits[0].double()
    (oi, ow), (ti, tw) = ours(0), theirs(0)
    oi, oo = oi.long().sort(dim=-1)
    ti, to = ti.sort(dim=-1)
    ow, tw = ow.gather(1, oo), tw.gather(1, to)
    same = (oi == ti).all(dim=-1)
    # Ids: the same set per token, except near-ties (two f32 evaluations of the score may order
    # two experts apart by ~1e-7 differently): those tokens' chosen scores must sum to the same
    # (within 1e-5, in f64), and be at most 0.1% of the tokens.
    differ = (~same).nonzero().flatten()
    gap = (choice[differ].gather(1, oi[differ]).sum(-1) - choice[differ].gather(1, ti[differ]).sum(-1)).abs()
    check(differ.numel() <= max(1, t // 1000), f"{differ.numel()} of {t} tokens chose other experts")
    gap = gap.max().item() if gap.numel() else 0.0
    check(gap <= 1e-5, f"not a near-tie: chosen scores differ by {gap:.2e}")
    # Weights: both f32 (a transcendental of a few ulp, a sum of k = 8, a division, a scale):
    # within 2^-17 of the largest weight (route_scale) leaves 8x the expected ~16 ulp.
    scale = 2.5 if v3 else 1.0
    err = (ow[same] - tw[same]).abs().max().item() if same.any() else 0.0
    check(err <= 2 ** -17 * scale, f"weights differ by {err:.2e}")
    note = f"ids: {differ.numel()} near-tie tokens; weights max err {err:.1e} (tol {2 ** -17 * scale:.1e})"
    return ours, theirs, t * experts * 4 + t * 8 * 8, HBM, note


def e4m3_within_rounding(codes, scales, x, who):
    """Dequantised 1x128 FP8 rows and their scales, after checking one rounding to E4M3 (3
    mantissa bits): within half an ulp of x, 2^-4 |x| for normals and 2^-10 scale for
    subnormals, with a 2^-10 margin (moekit rounds x * (448 / amax), not x / scale)."""
    blocks = x.view(x.shape[0], -1, 128)
    s = scales.reshape(x.shape[0], -1, 1)
    deq = codes.float().view_as(blocks) * s
    bound = (2 ** -4 * blocks.abs() + 2 ** -10 * s) * (1 + 2 ** -10)
    over = ((deq - blocks).abs() - bound).max().item()
    check(over <= 0, f"{who}: a dequantised value is {over:.2e} past its E4M3 rounding bound")
    return deq, s


def case_dispatch(dev, smoke, fp8):
    t, h, k, e = (32, 256, 8, 16) if smoke else (4096, 7168, 8, 256)
    ids = smoke_ids(t, e, k, dev) if smoke else v3_ids(t, dev)
    gen = torch.Generator(device=dev).manual_seed(2)
    xs = rotation(lambda: torch.randn(t, h, device=dev, generator=gen).to(torch.bfloat16), t * h * 2, dev)

    def ours(i):
        layout = moekit.dispatch_layout(ids, e, align=128)
        return layout, moekit.permute(xs[i % len(xs)], layout, k, fp8=fp8, align=128)

    theirs = lambda i: torch_dispatch(xs[i % len(xs)], ids, fp8)  # noqa: E731
    (layout, got), want = ours(0), theirs(0)
    order = torch.argsort(ids.flatten(), stable=True)
    rows = layout["row_map"].flatten()[order].long()  # our row of each of theirs
    x_pairs = xs[0].index_select(0, order // k).float()
    if not fp8:
        # A permute copies: bit-identical rows.
        check(torch.equal(got.index_select(0, rows), want), "permuted rows differ")
        note = "rows bit-identical"
    else:
        codes, scales = got[0].index_select(0, rows), got[1].view(-1, h // 128).index_select(0, rows)
        e4m3_within_rounding(codes, scales, x_pairs, "ours")
        e4m3_within_rounding(want[0], want[1], x_pairs, "theirs")
        # Where the two roundings differ (x * (448 / amax) vs x / scale at a tie), by one code.
        steps = (codes.view(torch.uint8).int() - want[0].view(torch.uint8).int()).abs()
        s_err = ((scales - want[1]).abs() / want[1]).max().item()
        note = (f"both within E4M3 rounding of x; codes differ at {int((steps > 0).sum())} of {steps.numel()} "
                f"(max {int(steps.max())} step), scales max rel err {s_err:.1e}")
    row = h + h // 128 * 4 if fp8 else 2 * h
    return ours, theirs, t * h * 2 + 8 * t * k + t * k * row, HBM, note


def case_combine(dev, smoke):
    t, h, k, e = (32, 256, 8, 16) if smoke else (4096, 7168, 8, 256)
    ids = smoke_ids(t, e, k, dev) if smoke else v3_ids(t, dev)
    layout = moekit.dispatch_layout(ids, e, align=128)
    rows = layout["m_indices"].shape[0]
    gen = torch.Generator(device=dev).manual_seed(3)
    ys = rotation(lambda: torch.randn(rows, h, device=dev, generator=gen).to(torch.bfloat16), t * k * h * 2, dev)
    w = torch.rand(t, k, device=dev, generator=gen)
    order = torch.argsort(ids.flatten(), stable=True)
    token, w_sorted = order // k, w.flatten()[order]
    # Theirs gets the same rows in its own (argsort) layout, gathered outside the timing.
    ys_sorted = [y.index_select(0, layout["row_map"].flatten()[order].long()) for y in ys]
    ours = lambda i: moekit.combine(ys[i % len(ys)], layout["row_map"], w)  # noqa: E731
    theirs = lambda i: torch_combine(ys_sorted[i % len(ys)], token, w_sorted, t)  # noqa: E731
    got, want = ours(0).float(), theirs(0).float()
    abs_sum = torch.zeros(t, h, device=dev).index_add_(0, token, (ys_sorted[0].float() * w_sorted[:, None]).abs())
    # Both: an f32 sum of k = 8 products (any order: within k 2^-24 of the sum of magnitudes),
    # rounded once to BF16; two roundings of values that close are at most one BF16 ulp apart
    # (2^-7 of the value).
    tol = 2 ** -7 * torch.maximum(got.abs(), want.abs()) + 2 ** -20 * abs_sum
    err = (got - want).abs()
    check(bool((err <= tol).all()), f"combine differs by {(err - tol).max().item():.2e} past its bound")
    return ours, theirs, t * k * h * 2 + t * k * 8 + t * h * 2, HBM, f"max err {err.max().item():.3g} (<= 1 BF16 ulp)"


def gemm_check(got, want, abs_dot, fp8):
    """ours vs theirs for the same exact operand values, both accumulating in f32: at most one
    BF16 ulp apart after the output rounding (2^-7 of the value) plus the accumulation error,
    bounded by c times sum |a||b| (BF16: c = 2^-12, far above f32's ~sqrt(K) 2^-24; FP8:
    c = 2^-10 for a tensor-core FP8 accumulator of ~14 bits promoted to f32 every 128 of K);
    and in aggregate within 2^-7 (Frobenius; the rounding alone is ~2^-9)."""
    got, want = got.float(), want.float()
    c = 2 ** -10 if fp8 else 2 ** -12
    err = (got - want).abs()
    tol = 2 ** -7 * torch.maximum(got.abs(), want.abs()) + c * abs_dot.float()
    check(bool((err <= tol).all()), f"elementwise: {(err - tol).max().item():.3g} past the bound")
    rel = (torch.linalg.vector_norm(got - want) / torch.linalg.vector_norm(want)).item()
    check(rel <= 2 ** -7, f"relative Frobenius error {rel:.2e} > 2^-7")
    return f"max err {err.max().item():.3g}, rel Frobenius {rel:.1e}"


def gemm_operands(gen, dev, shape_a, shape_b, fp8, br_b):
    """Random operands: BF16, or FP8 codes with power-of-two scales (1x128 for A, br_b x 128 for B)."""
    a = torch.randn(*shape_a, device=dev, generator=gen)
    b = torch.randn(*shape_b, device=dev, generator=gen)
    if not fp8:
        return (a.to(torch.bfloat16), None), (b.to(torch.bfloat16), None)
    return pow2_quant(a, 1, 128), pow2_quant(b, br_b, 128)


def deq(op, br):
    data, scales = op
    return data if scales is None else dequant(data, scales, br, 128)


def case_contiguous(dev, smoke, fp8, sizes, n, k):
    if smoke:
        sizes, n, k = ([128, 128] if sizes is not None else [40, 0, 7, 83]), 256, 256
    elif sizes is None:  # gg-bf16-v3-prefill: the experts' loads of a V3 routing of 4096 tokens
        sizes = torch.bincount(v3_ids(4096, dev).flatten().long(), minlength=256).tolist()
    g = len(sizes)
    padded = [-(-s // 128) * 128 for s in sizes]
    m_idx = torch.cat([torch.tensor([i] * s + [-1] * (p - s), dtype=torch.int32) for i, (s, p) in
                       enumerate(zip(sizes, padded))]).to(dev)
    gen = torch.Generator(device=dev).manual_seed(4)
    opa, opb = gemm_operands(gen, dev, (sum(padded), k), (g, n, k), fp8, 128)
    valid = (m_idx >= 0).nonzero().flatten()
    kw = dict(a_scales=opa[1].reshape(-1), b_scales=opb[1]) if fp8 else {}
    ours = lambda i: moekit.gemm_contiguous(opa[0], opb[0], m_idx, **kw)  # noqa: E731
    a_rows = (opa[0].index_select(0, valid), None if opa[1] is None else opa[1].index_select(0, valid))
    theirs = lambda i: grouped_mm(deq(a_rows, 1), deq(opb, 128), sizes)  # noqa: E731
    got, want = ours(0).index_select(0, valid), theirs(0)
    abs_dot = grouped_mm(deq(a_rows, 1).abs(), deq(opb, 128).abs(), sizes)
    note = gemm_check(got, want, abs_dot, fp8)
    return ours, theirs, 2 * sum(sizes) * n * k, FP8_RATE if fp8 else BF16_RATE, note


def case_masked(dev, smoke, g, m, n, k):
    if smoke:
        m, n, k = 64, 256, 256
    gen = torch.Generator(device=dev).manual_seed(5)
    opa, opb = gemm_operands(gen, dev, (g, m, k), (g, n, k), True, 128)
    ours = lambda i: moekit.gemm_masked(opa[0], opb[0], a_scales=opa[1].reshape(-1), b_scales=opb[1])  # noqa: E731
    theirs = lambda i: torch.bmm(deq(opa, 1), deq(opb, 128).transpose(1, 2))  # noqa: E731
    got, want = ours(0), theirs(0)
    note = gemm_check(got, want, torch.bmm(deq(opa, 1).abs(), deq(opb, 128).abs().transpose(1, 2)), True)
    return ours, theirs, 2 * g * m * n * k, FP8_RATE, note


def case_k_grouped(dev, smoke, g, per_group, n, k):
    if smoke:
        per_group, n, k = 128, 256, 128
    m = g * per_group
    offsets = torch.arange(0, m + 1, per_group, dtype=torch.int32, device=dev)
    gen = torch.Generator(device=dev).manual_seed(6)
    # a = dY^T [n, m], b = X^T [k, m], 1x128 scales along the tokens.
    opa, opb = gemm_operands(gen, dev, (n, m), (k, m), True, 1)

    def loop(a, b):
        return torch.stack([a[:, lo:lo + per_group] @ b[:, lo:lo + per_group].T for lo in range(0, m, per_group)])

    ours = lambda i: moekit.gemm_k_grouped(opa[0], opb[0], offsets, a_scales=opa[1].reshape(-1),  # noqa: E731
                                           b_scales=opb[1].reshape(-1))
    theirs = lambda i: loop(deq(opa, 1), deq(opb, 1))  # noqa: E731
    got, want = ours(0), theirs(0)
    note = gemm_check(got, want, loop(deq(opa, 1).abs(), deq(opb, 1).abs()), True)
    return ours, theirs, 2 * m * n * k, FP8_RATE, note


CASES = [
    ("gate-v3-4k", "DeepSeek-V3 reference routing", lambda d, s: case_gate(d, s, 4096, 256, True)),
    ("gate-v3-64k", "DeepSeek-V3 reference routing", lambda d, s: case_gate(d, s, 65536, 256, True)),
    ("gate-qwen3-4k", "softmax, topk, renorm", lambda d, s: case_gate(d, s, 4096, 128, False)),
    ("dispatch-fp8-v3", "argsort, index_select, quant", lambda d, s: case_dispatch(d, s, True)),
    ("dispatch-bf16-v3", "argsort, index_select", lambda d, s: case_dispatch(d, s, False)),
    ("combine-v3", "f32 index_add_", lambda d, s: case_combine(d, s)),
    ("gg-fp8-contig-a", "dequant + GROUPED", lambda d, s: case_contiguous(d, s, True, [8192] * 4, 4096, 7168)),
    ("gg-fp8-contig-b", "dequant + GROUPED", lambda d, s: case_contiguous(d, s, True, [8192] * 4, 7168, 2048)),
    ("gg-fp8-contig-c", "dequant + GROUPED", lambda d, s: case_contiguous(d, s, True, [4096] * 8, 4096, 7168)),
    ("gg-fp8-masked-a", "dequant + bmm", lambda d, s: case_masked(d, s, 1, 1024, 4096, 7168)),
    ("gg-fp8-masked-b", "dequant + bmm", lambda d, s: case_masked(d, s, 4, 256, 4096, 7168)),
    ("gg-bf16-contig-a", "GROUPED", lambda d, s: case_contiguous(d, s, False, [8192] * 4, 4096, 7168)),
    ("gg-bf16-v3-prefill", "GROUPED", lambda d, s: case_contiguous(d, s, False, None, 4096, 7168)),
    ("gg-fp8-kgrouped", "dequant + matmul loop", lambda d, s: case_k_grouped(d, s, 4, 4096, 7168, 4096)),
]


def fmt_us(v):
    return "-" if v is None else f"{v:.1f}"


def fraction(work, ceiling, us):
    return "-" if us is None else f"{100 * work / (us * 1e-6) / ceiling:.1f}%"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU tensors (the CPU path), no timing")
    p.add_argument("--only", action="append", help="run only this shape (repeatable)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--out", help="also write the table (markdown) to this file")
    args = p.parse_args()
    cuda = not args.cpu_smoke
    if cuda and not torch.cuda.is_available():
        sys.exit("torch_side_by_side: no CUDA device for torch (use --cpu-smoke for the CPU path)")
    dev = torch.device("cuda" if cuda else "cpu")
    warmup, reps = (args.warmup, args.reps) if cuda else (1, 2)
    where = torch.cuda.get_device_name(dev) if cuda else "CPU (smoke: tiny shapes, times not reported)"
    timing = f"median of {reps} after {warmup} warm-up (CUDA events)" if cuda else "no timing"
    header = [f"moekit {moekit.version()} vs torch {torch.__version__} on {where}, "
              f"{datetime.date.today().isoformat()}; {timing}", "",
              "| shape | ours (us) | theirs (us) | theirs / ours | ours of ceiling | theirs of ceiling | theirs | check |",
              "|---|---|---|---|---|---|---|---|"]
    lines, failed = [], 0
    for name, peer, make in CASES:
        if args.only and name not in args.only:
            continue
        try:
            ours, theirs, work, ceiling, note = make(dev, args.cpu_smoke)
            t_ours = median_us(ours, warmup, reps, cuda)
            t_theirs = median_us(theirs, warmup, reps, cuda)
            if not cuda:
                t_ours = t_theirs = None
            ratio = "-" if t_ours is None else f"{t_theirs / t_ours:.2f}"
            peer = peer.replace("GROUPED", grouped_name())
            line = (f"| {name} | {fmt_us(t_ours)} | {fmt_us(t_theirs)} | {ratio} | {fraction(work, ceiling, t_ours)} "
                    f"| {fraction(work, ceiling, t_theirs)} | {peer} | ok: {note} |")
        except CheckFailed as e:
            failed += 1
            line = f"| {name} | - | - | - | - | - | {peer} | FAILED: {e} |"
        except Exception as e:  # moekit or torch refused, or out of memory: also a failure
            traceback.print_exc()
            failed += 1
            line = f"| {name} | - | - | - | - | - | {peer} | ERROR: {type(e).__name__}: {str(e).splitlines()[0]} |"
        print(line, flush=True)
        lines.append(line)
        if cuda:
            torch.cuda.empty_cache()
    ceilings = ("Ceilings: memory-bound ops (gate, dispatch, combine) minimum bytes / time against 4.3 TB/s "
                "(H200 copy, measured); GEMMs FLOPs / time against 790 TFLOPS BF16 (measured) and 1979 "
                "TFLOPS FP8 (datasheet).")
    table = "\n".join(header + lines + ["", ceilings, f"{failed} check(s) failed" if failed else "all checks passed"])
    print("\n" + table)
    if args.out:
        pathlib.Path(args.out).write_text(table + "\n")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
