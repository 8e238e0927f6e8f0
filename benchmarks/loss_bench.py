"""Contrastive-loss fwd+bwd time and peak memory: clipkit chunked vs open_clip vs clipkit naive,
for CLIP, SigLIP and CLIP + distillation (`--kinds clip siglip distill`).

    python benchmarks/loss_bench.py                        # B in 4096 8192 16384 32768, D=512, fp32
    python benchmarks/loss_bench.py --batch 4096 8192 --reps 3 --out /tmp/bench.json
    python benchmarks/loss_bench.py --chunk auto 256 1024   # the default chunk against fixed rows
    python benchmarks/loss_bench.py --multi-positive 4 --batch 8192   # B images x 4 texts each

`--multi-positive K` runs the multi-positive softmax InfoNCE (`loss=multi_text`) with K texts per
image (a [B, K, D] text batch, every slot valid, through the masked path): the chunked fused loss
against a materialized PyTorch implementation that holds the [B, B·K] logits (`materialized`),
and prints their time and peak-memory ratios. Alone it runs only that case; with `--kinds`, both.

`--chunk auto` (the default) runs the chunked path as a user gets it by default
(`loss.chunk_size=auto`: chunks of `CHUNK_ELEMS` logits); the rows it chose are reported.

Every (loss, implementation, B) runs in its own subprocess so that its peak resident
memory is the loss's own: the kernel's peak-RSS mark is reset once the inputs exist
(/proc/self/clear_refs), and the reported peak is VmHWM minus the RSS at that point.
Children run with MALLOC_MMAP_THRESHOLD_=1 MiB so freed blocks go back to the OS. Prints a table
with ratios to open_clip and writes JSON to `--out`. CPU; the GPU benchmark (Triton,
Inf-CL, torch.compile) is `benchmarks/loss_bench_gpu.py`. The device is printed.

The 4U floor: an exact fused CLIP step needs 4 B×B×D matmuls (2·B²·D FLOP each; SigLIP 3),
so `floor_s` = 4·2·B²·D / R, with R this machine's fp32 GEMM rate as torch measures it
(the best of a few large `torch.mm` shapes, in a child process like the rows). `vs_floor`
= median_s / floor_s: how far each implementation is from doing nothing but those matmuls.
A CPU has no datasheet peak that torch reaches, so the measured rate stands in for it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

IMPLS = {
    "multi_positive": ["materialized", "chunked"],  # B images x B·K texts (`--multi-positive K`)
    "clip": ["open_clip", "naive", "chunked"],
    "siglip": ["open_clip", "naive", "chunked"],
    "distill": ["open_clip", "naive", "chunked"],  # CLIP + KL to a teacher's logits (D_t = D)
}


def _distill_fn(impl: str, chunk: int | None):
    """(image, text, scale, bias, teacher_image, teacher_text) -> CLIP + distillation loss."""
    if impl == "open_clip":
        from open_clip.loss import DistillClipLoss
        module = DistillClipLoss()

        def fn(i, t, s, b, ti, tt):
            return sum(module(i, t, s, ti, tt, s.detach() * 1.5))
        return fn
    if impl == "naive":
        from clipkit.losses.functional import clip_loss_block, distill_kl_block

        def fn(i, t, s, b, ti, tt):
            ts = s.detach() * 1.5
            kl = distill_kl_block(i, t, s, ti, tt, ts) + distill_kl_block(t, i, s, tt, ti, ts)
            return clip_loss_block(i, t, i, t, s, 0) + kl / (2 * len(i))
        return fn
    from clipkit.losses.fused import fused_clip_loss, fused_distill_kl

    def fn(i, t, s, b, ti, tt):
        return fused_clip_loss(i, t, s, chunk=chunk) + fused_distill_kl(i, t, s, ti, tt, s.detach() * 1.5, chunk=chunk)
    return fn


def materialized_multi_positive(image, text, valid, scale):
    """The multi-positive InfoNCE as one would write it in PyTorch with the [B, B·K] logits in
    memory: a masked row log-softmax (image->text, uniform target over an image's valid texts)
    and a column log-softmax (text->image, DreamLIP's Eq. 5), each averaged as in
    `clipkit.losses.functional.multi_positive_clip_loss` (its value, to float32 rounding)."""
    import torch
    import torch.nn.functional as F

    big_b, k, d = text.shape
    logits = scale * image @ text.reshape(big_b * k, d).T
    diagonal = torch.arange(big_b, device=image.device)
    row = F.log_softmax(logits.masked_fill(~valid.reshape(1, -1), float("-inf")), dim=1)
    own_row = row.view(big_b, big_b, k)[diagonal, diagonal]  # [B, K]: each image's own texts
    col = F.log_softmax(logits, dim=0).view(big_b, big_b, k)[diagonal, diagonal]
    count = valid.sum(dim=1)
    has = count > 0
    image_to_text = -(torch.where(valid, own_row, 0.0).sum(dim=1)[has] / count[has]).sum() / has.sum().clamp(min=1)
    text_to_image = -torch.where(valid, col, 0.0).sum() / valid.sum().clamp(min=1)
    return (image_to_text + text_to_image) / 2


def _multi_positive_fn(impl: str, chunk: int | None):
    """(image, text [B, K, D], valid [B, K], scale) -> the multi-positive InfoNCE."""
    if impl == "materialized":
        return materialized_multi_positive
    from clipkit.losses.fused import multi_positive_clip_loss

    return lambda i, t, v, s: multi_positive_clip_loss(i, t, v, s, impl=impl, chunk=chunk)


def _loss_fn(kind: str, impl: str, chunk: int | None):
    """(image, text, scale, bias, teacher_image, teacher_text) -> scalar loss for one implementation."""
    if kind == "distill":
        return _distill_fn(impl, chunk)
    if impl == "open_clip":
        from open_clip.loss import ClipLoss, SigLipLoss
        if kind == "clip":
            module = ClipLoss()
            return lambda i, t, s, b, *_: module(i, t, s)
        module = SigLipLoss()
        return lambda i, t, s, b, *_: module(i, t, s, b)
    if impl == "naive":
        from clipkit.losses.functional import clip_loss_block, siglip_loss_block
        if kind == "clip":
            return lambda i, t, s, b, *_: clip_loss_block(i, t, i, t, s, 0)
        return lambda i, t, s, b, *_: siglip_loss_block(i, t, s, b, 0)
    from clipkit.losses.fused import fused_clip_loss, fused_siglip_loss
    if kind == "clip":
        return lambda i, t, s, b, *_: fused_clip_loss(i, t, s, impl=impl, chunk=chunk)
    return lambda i, t, s, b, *_: fused_siglip_loss(i, t, s, b, impl=impl, chunk=chunk)


MATMULS = {"clip": 4, "siglip": 3, "multi_positive": 4}  # B×B×D products of an exact fused step (B×BK×D for
# multi_positive; no floor is claimed for distill)


def gemm_rate(dim: int) -> float:
    """Best fp32 FLOP/s of torch.mm over shapes like the loss's blocks ([m, D] @ [D, n] and [m, n] @ [n, D])."""
    import torch

    best = 0.0
    for m, k, n in ((4096, dim, 8192), (4096, 8192, dim), (8192, dim, 8192)):
        a, b = torch.randn(m, k), torch.randn(k, n)
        a @ b  # warm-up
        start = time.perf_counter()
        for _ in range(3):
            a @ b
        best = max(best, 3 * 2 * m * k * n / (time.perf_counter() - start))
    return best


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def reset_peak_rss_kib() -> tuple[int, bool]:
    """Current RSS, with the kernel's peak-RSS mark (VmHWM) reset to it where Linux allows.

    Without the reset the peak would still hold the imports' transient high-water mark,
    which can hide a small loss entirely. Returns (baseline KiB, whether the reset worked).
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_kib("VmRSS"), True
    except OSError:
        return max(_status_kib("VmRSS"), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss), False


def parse_chunk(text: str) -> int | None:
    """`--chunk` values: "auto" (None, the loss's default) or rows per chunk."""
    return None if text == "auto" else int(text)


def measure(kind: str, impl: str, batch: int, dim: int, chunk: int | None, reps: int, texts: int = 1) -> dict:
    """Runs in the child: median fwd+bwd seconds and peak RSS growth over the inputs.
    `texts`: K texts per image (kind multi_positive only)."""
    import torch
    import torch.nn.functional as F

    from clipkit.kernels.chunked_contrastive import chunk_rows

    g = torch.Generator().manual_seed(0)
    image = F.normalize(torch.randn(batch, dim, generator=g), dim=-1).requires_grad_()
    if kind == "multi_positive":
        text = F.normalize(torch.randn(batch, texts, dim, generator=g), dim=-1).requires_grad_()
        valid = torch.ones(batch, texts, dtype=torch.bool)
        mp_fn = _multi_positive_fn(impl, chunk)

        def fn(i, t, s, *_):
            return mp_fn(i, t, valid, s)
    else:
        text = F.normalize(torch.randn(batch, dim, generator=g), dim=-1).requires_grad_()
        fn = _loss_fn(kind, impl, chunk)
    scale = torch.tensor(14.3, requires_grad=True)
    bias = torch.tensor(-10.0, requires_grad=True)
    teacher = [F.normalize(torch.randn(batch, dim, generator=g), dim=-1) for _ in range(2)]
    base_kib, exact = reset_peak_rss_kib()
    times = []
    for _ in range(reps + 1):  # the first run warms up and is dropped
        image.grad = text.grad = scale.grad = bias.grad = None
        start = time.perf_counter()
        fn(image, text, scale, bias, *teacher).backward()
        times.append(time.perf_counter() - start)
    peak_kib = _status_kib("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    chunked = impl == "chunked"
    columns = batch * texts
    return {"kind": kind, "impl": impl, "batch": batch, "dim": dim, "texts": texts,
            "chunk": ("auto" if chunk is None else chunk) if chunked else None,
            "chunk_rows": min(batch, chunk_rows(chunk, columns)) if chunked else None,  # rows a chunk held
            "median_s": statistics.median(times[1:]), "times_s": times[1:],
            "peak_mb": (peak_kib - base_kib) / 1024, "peak_reset": exact}


def run_child(kind: str, impl: str, batch: int, dim: int, chunk: int | None, reps: int, threads: int,
              texts: int = 1) -> dict:
    """One row (or, for kind "gemm", {"flops": rate}) measured in a fresh process."""
    cmd = [sys.executable, __file__, "--child", kind, impl, str(batch), str(dim),
           "auto" if chunk is None else str(chunk), str(reps),
           "--threads", str(threads), "--multi-positive", str(texts)]
    # A fixed mmap threshold keeps glibc from parking freed large blocks in a fragmented
    # heap (its default raises the threshold to 32 MB), so RSS tracks live tensors for all.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def device_name() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU: {cpu}"


def chunk_label(row: dict) -> str:
    """"-" (not chunked), the fixed rows, or "auto=<rows it chose>"."""
    if row["chunk"] is None:
        return "-"
    return f"auto={row['chunk_rows']}" if row["chunk"] == "auto" else str(row["chunk"])


def print_table(rows: list[dict]) -> None:
    """time/ref and mem/ref: against open_clip, or the materialized loss for multi_positive."""
    print(f"{'loss':7} {'B':>6} {'impl':12} {'chunk':>10} {'fwd+bwd s':>10} {'peak MB':>9} "
          f"{'time/ref':>8} {'mem/ref':>8} {'vs floor':>9}")
    for r in rows:
        kind = r["kind"] if r["kind"] != "multi_positive" else f"mp K={r['texts']}"
        print(f"{kind:7} {r['batch']:>6} {r['impl']:12} {chunk_label(r):>10} {r['median_s']:>10.3f} "
              f"{r['peak_mb']:>9.1f} {r['time_vs_open_clip']:>8.3f} {r['mem_vs_open_clip']:>8.3f} "
              f"{r['vs_floor']:>8.2f}x")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--chunk", type=parse_chunk, nargs="+", default=[None], metavar="auto|ROWS",
                   help="chunk sizes for the chunked path: auto (the loss's default, the default here) or rows")
    p.add_argument("--kinds", nargs="+", default=None, choices=sorted(IMPLS),
                   help="default: clip siglip, or only multi_positive when --multi-positive is given")
    p.add_argument("--multi-positive", type=int, default=None, metavar="K",
                   help="run the multi-positive InfoNCE with K texts per image: chunked vs materialized")
    p.add_argument("--impls", nargs="+", default=None, help="subset of open_clip naive chunked (materialized)")
    p.add_argument("--reps", type=int, default=3, help="timed runs after one warm-up (median reported)")
    p.add_argument("--threads", type=int, default=0, help="torch threads in the children (0 = torch default)")
    p.add_argument("--out", default=None, help="JSON path (default: results/loss_bench_cpu.json, or "
                   "results/loss_bench_multi_positive_cpu.json when only the multi-positive case runs)")
    p.add_argument("--child", nargs=6, metavar=("KIND", "IMPL", "B", "D", "CHUNK", "REPS"), help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.child:
        import torch
        if args.threads:
            torch.set_num_threads(args.threads)
        kind, impl, batch, dim, chunk, reps = args.child
        print(json.dumps({"flops": gemm_rate(args.dim)} if kind == "gemm" else
                         measure(kind, impl, int(batch), int(dim), parse_chunk(chunk), int(reps),
                                 args.multi_positive or 1)))
        return
    kinds = args.kinds or (["multi_positive"] if args.multi_positive else ["clip", "siglip"])
    if args.out is None:
        name = "loss_bench_multi_positive_cpu.json" if kinds == ["multi_positive"] else "loss_bench_cpu.json"
        args.out = str(Path(__file__).parent / "results" / name)
    if "multi_positive" in kinds and not args.multi_positive:
        p.error("--kinds multi_positive needs --multi-positive K")

    batches = sorted(set(args.batch))
    rate = run_child("gemm", "-", 0, args.dim, 1, 0, args.threads)["flops"]
    print(f"device: {device_name()}; D={args.dim}, fp32, median of {args.reps} after 1 warm-up; "
          f"measured fp32 GEMM rate {rate / 1e9:.1f} GFLOP/s", flush=True)
    rows = []
    for kind in kinds:
        texts = args.multi_positive if kind == "multi_positive" else 1
        for batch in batches:
            group = []
            for impl in [i for i in (args.impls or IMPLS[kind]) if i in IMPLS[kind]]:
                for chunk in (args.chunk if impl == "chunked" else [0]):
                    r = run_child(kind, impl, batch, args.dim, chunk, args.reps, args.threads, texts)
                    print(f"  {kind} B={batch}{f' K={texts}' if texts > 1 else ''} {impl} chunk={chunk_label(r)}: "
                          f"{r['median_s']:.3f} s, {r['peak_mb']:.1f} MB", flush=True)
                    group.append(r)
            # The baseline of the ratios: open_clip, or for multi_positive the materialized [B, B·K] loss.
            ref = next((r for r in group if r["impl"] in ("open_clip", "materialized")), None)
            floor_s = (MATMULS[kind] * 2 * batch ** 2 * texts * args.dim / rate if kind in MATMULS
                       else float("nan"))
            for r in group:
                r["time_vs_open_clip"] = r["median_s"] / ref["median_s"] if ref else float("nan")
                r["mem_vs_open_clip"] = r["peak_mb"] / ref["peak_mb"] if ref else float("nan")
                r["floor_s"], r["vs_floor"] = floor_s, r["median_s"] / floor_s
            rows += group
    print_table(rows)
    for r in rows:
        if r["kind"] == "multi_positive" and r["impl"] == "chunked":
            print(f"multi_positive B={r['batch']} K={r['texts']} chunked / materialized: time "
                  f"{r['time_vs_open_clip']:.3f}x, peak memory {r['mem_vs_open_clip']:.4f}x "
                  f"({r['peak_mb']:.0f} MB vs {r['peak_mb'] / r['mem_vs_open_clip']:.0f} MB)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": device_name(), "dim": args.dim, "dtype": "float32", "reps": args.reps,
                               "gemm_flops": rate, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
