#!/usr/bin/env python3
"""What a user would run instead of vistok on a GPU, timed on the shapes of vistok's cuda bench
rows, so that scripts/gpu-check.sh can print same-machine, same-session ratios.

torch only (the lent GPU machine has it; nothing is installed). CUDA events, median of 20
after 5 warm-ups. Prints one line per row: id, median ms, and GB/s or TFLOP/s counted the way
vistok's harness counts them. Skips (one line) when torch or a GPU is missing.
"""
import sys

try:
    import torch
    import torch.nn.functional as F
except ImportError:
    print("gpu peers: skipped: no torch")
    sys.exit(0)
if not torch.cuda.is_available():
    print("gpu peers: skipped: torch sees no GPU")
    sys.exit(0)

dev = torch.device("cuda")
torch.manual_seed(0)


def timed(fn, reps=20, warm=5):
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def row(name, ms, gb=None, gflop=None):
    rate = []
    if gb is not None:
        rate.append(f"{gb / ms:9.1f} GB/s")
    if gflop is not None:
        rate.append(f"{gflop / ms:9.1f} TFLOP/s")
    print(f"{name:58s} {ms:9.4f} ms  {'  '.join(rate)}", flush=True)


def attention():
    for dt, dname in ((torch.bfloat16, "bf16"), (torch.float16, "f16")):
        for b, h, n, d, causal in ((1, 12, 1024, 64, False), (1, 12, 4096, 64, False), (8, 16, 4096, 64, False),
                                   (8, 16, 4096, 128, False), (8, 16, 4096, 64, True), (1, 16, 1024, 128, False)):
            q, k, v = (torch.randn(b, h, n, d, device=dev, dtype=dt) for _ in range(3))
            ms = timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal))
            flop = 4 * b * h * n * n * d / (2 if causal else 1)
            row(f"torch-sdpa/{dname}/{b}x{h}x{n}x{d}{'-causal' if causal else ''}", ms, gflop=flop / 1e9)


def argmin():
    for n, k, d in ((65536, 16384, 8), (65536, 16384, 256), (65536, 1024, 256), (4096, 262144, 8)):
        for dt, dname in ((torch.float32, "f32"), (torch.bfloat16, "bf16")):
            x, e = torch.randn(n, d, device=dev, dtype=dt), torch.randn(k, d, device=dev, dtype=dt)
            e2 = (e.float() ** 2).sum(1)

            def run():
                # taming-transformers / LlamaGen: ||e||^2 - 2 x.e^T, argmin (materialises N x K)
                return torch.argmin(e2 - 2 * (x @ e.t()).float(), dim=1)

            row(f"torch-mm-argmin/{dname}/{n}x{k}x{d}", timed(run, reps=10), gflop=2 * n * k * d / 1e9)


def quant():
    n, c = 1 << 24, 18
    z = torch.randn(n, c, device=dev)
    p = 2 ** torch.arange(c - 1, -1, -1, device=dev, dtype=torch.int32)
    row(f"torch-lfq/f32/{n}x{c}", timed(lambda: ((z > 0).int() * p).sum(-1)), gb=(n * c * 4 + n * 4) / 1e6)
    levels = torch.tensor([8, 8, 8, 5, 5, 5], device=dev)
    z6 = torch.randn(n, 6, device=dev)
    half_l = (levels - 1) * (1 + 1e-3) / 2
    offset = torch.where(levels % 2 == 0, 0.5, 0.0)
    shift = (offset / half_l).atanh()
    basis = torch.cumprod(torch.cat([torch.ones(1, device=dev, dtype=levels.dtype), levels[:-1]]), 0)
    hw = levels // 2

    def fsq():
        q = torch.round((z6 + shift).tanh() * half_l - offset)
        return ((q + hw) * basis).sum(-1).int()

    row(f"torch-fsq/f32/{n}x6", timed(fsq), gb=(n * 6 * 4 + n * 4) / 1e6)


def tome():
    for b, n, c, r in ((8, 197, 768, 49), (8, 1024, 768, 256), (2, 4096, 320, 2048)):
        for dt, dname in ((torch.float32, "f32"), (torch.bfloat16, "bf16")):
            x = torch.randn(b, n, c, device=dev, dtype=dt)

            def run():
                m = x / x.norm(dim=-1, keepdim=True)
                a, bb = m[..., ::2, :], m[..., 1::2, :]
                scores = a @ bb.transpose(-1, -2)
                node_max, node_idx = scores.max(dim=-1)
                edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
                unm_idx, src_idx = edge_idx[..., r:, :], edge_idx[..., :r, :]
                dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)
                src, dst = x[..., ::2, :], x[..., 1::2, :]
                unm = src.gather(dim=-2, index=unm_idx.expand(b, -1, c))
                s = src.gather(dim=-2, index=src_idx.expand(b, r, c))
                dst = dst.scatter_reduce(-2, dst_idx.expand(b, r, c), s, reduce="mean")
                return torch.cat([unm, dst], dim=1)

            sim = 2 * b * (n // 2) * ((n + 1) // 2) * c
            row(f"torch-tome/{dname}/{b}x{n}x{c}-r{r}", timed(run), gflop=sim / 1e9)


def copy():
    a = torch.empty(1 << 28, device=dev, dtype=torch.float32)
    bb = torch.empty_like(a)
    row("torch-copy/f32/2^28 (read + write)", timed(lambda: bb.copy_(a)), gb=2 * a.numel() * 4 / 1e6)


def matmul():
    for dt, dname in ((torch.bfloat16, "bf16"), (torch.float32, "f32")):
        a = torch.randn(8192, 8192, device=dev, dtype=dt)
        bb = torch.randn(8192, 8192, device=dev, dtype=dt)
        torch.backends.cuda.matmul.allow_tf32 = False
        row(f"torch-mm/{dname}/8192^3 (dense peak)", timed(lambda: a @ bb, reps=10), gflop=2 * 8192**3 / 1e9)


sections = {"copy": copy, "mm": matmul, "attn": attention, "argmin": argmin, "quant": quant, "tome": tome}
want = sys.argv[1:] or list(sections)
print(f"gpu peers on {torch.cuda.get_device_name()} (torch {torch.__version__})")
for s in want:
    try:
        sections[s]()
    except Exception as e:  # a peer failing must not hide the rest
        print(f"gpu peers: {s}: failed: {e!r}")
