"""CLIP/SigLIP loss fwd+bwd on GPU: clipkit's Triton kernels vs open_clip, torch.compile'd naive, Inf-CL.

    python benchmarks/loss_bench_gpu.py                                   # B 4096 … 1M, D 512 768, bf16 fp32
    python benchmarks/loss_bench_gpu.py --batch 65536 262144 --dim 512 --dtype bf16 --impls triton infcl
    python benchmarks/loss_bench_gpu.py --interpret --batch 128 --dim 32  # CPU, Triton interpreter: a smoke run

Each row is one (loss, implementation, B, D, dtype): median fwd+bwd time over `--reps`
after `--warmup` runs (CUDA events), and peak memory above the inputs
(torch.cuda.max_memory_allocated after a reset, so the features and their gradients are
not counted). `x 4U` is the time over the 4U floor: 4·2·B²·D FLOP at the device's dense
peak for the dtype (PEAK_FLOPS; SigLIP's own minimum is 3U, the column keeps one
yardstick); `x 4U meas` the same at the rate torch.mm reaches on this device in this run
(an 8192³ GEMM in the dtype, no TF32), the floor that is actually attainable. `rel err` is
the loss against open_clip's on the same inputs where both ran.
A run that does not fit prints OOM, and the larger B of that implementation are skipped.

Implementations:
  triton      clipkit.kernels.triton_contrastive through a local one-process autograd
              Function (forward: stats; backward: grads; d(scale) = Σ q·dq); SigLIP forms
              its gradients in the forward (3 matmuls in one pass).
  chunked     clipkit's chunked PyTorch kernels (`loss.impl=chunked`, chunk_size auto) through
              clipkit.losses.fused: what runs where Triton does not.
  open_clip   open_clip.loss.ClipLoss / SigLipLoss (materialized B×B logits).
  compiled    the naive materialized loss under torch.compile (up to --compiled-max-batch).
  infcl       Inf-CL's cal_inf_loss, both directions (`pip install inf-cl`; CLIP only).
Writes JSON to --out (default benchmarks/results/loss_bench_gpu.json).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

IMPLS = ["triton", "chunked", "open_clip", "compiled", "infcl"]
DTYPES = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}
# Dense peak FLOP/s by device-name substring, per input dtype. fp32 is the CUDA-core peak:
# the Triton path multiplies float32 inputs in exact fp32 ("ieee"), not TF32.
PEAK_FLOPS = {
    "H200": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
    "H100 PCIe": {"bf16": 756e12, "fp16": 756e12, "fp32": 51e12},
    "H100": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
    "A100": {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12},
    "L40S": {"bf16": 362e12, "fp16": 362e12, "fp32": 91.6e12},
}


def peak_flops(device_name: str, dtype: str) -> float:
    for key, peaks in PEAK_FLOPS.items():  # "H100 PCIe" is listed before "H100"
        if key in device_name:
            return peaks[dtype]
    return math.nan


def measured_gemm_flops(dtype: str, n: int = 8192, reps: int = 10) -> float:
    """FLOP/s of torch.mm on [n, n] x [n, n] in `dtype` on the current GPU (median of `reps`)."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 is timed as the Triton path multiplies: exact fp32
    tdt = getattr(torch, DTYPES[dtype])
    a = torch.randn(n, n, device="cuda").to(tdt)
    b = torch.randn(n, n, device="cuda").to(tdt)
    times = []
    for step in range(reps + 2):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.mm(a, b)
        end.record()
        torch.cuda.synchronize()
        if step >= 2:
            times.append(start.elapsed_time(end) / 1e3)
    del a, b
    torch.cuda.empty_cache()
    return 2 * n**3 / statistics.median(times)


def triton_losses(chunk: int, tiles=None):
    """(clip, siglip) loss functions of (image, text, scale, bias) built from the primitives."""
    import torch

    from clipkit.kernels import triton_contrastive as tc

    infonce_block_stats = functools.partial(tc.infonce_block_stats, tiles=tiles)
    infonce_block_grads = functools.partial(tc.infonce_block_grads, tiles=tiles)
    sigmoid_block = functools.partial(tc.sigmoid_block, tiles=tiles)

    class Clip(torch.autograd.Function):
        @staticmethod
        def forward(ctx, image, text, scale):
            row_lse, col_max, col_sumexp, pos = infonce_block_stats(image, text, scale, 0, chunk)
            col_lse = col_max + col_sumexp.log()
            ctx.save_for_backward(image, text, scale, row_lse, col_lse)
            return (row_lse.sum() + col_lse.sum() - 2 * pos) / (2 * image.shape[0])

        @staticmethod
        def backward(ctx, grad):
            image, text, scale, row_lse, col_lse = ctx.saved_tensors
            dq, dk = infonce_block_grads(image, text, scale, 0, row_lse, col_lse, chunk, True, True)
            coef = grad / (2 * image.shape[0])
            ds = (dq * image.float()).sum() * coef
            s = scale.detach().float() * coef
            return (dq.mul_(s).to(image.dtype), dk.mul_(s).to(text.dtype),
                    ds.reshape(scale.shape).to(scale.dtype))

    class Sig(torch.autograd.Function):
        @staticmethod
        def forward(ctx, image, text, scale, bias):
            loss, dq, dk, gsum = sigmoid_block(image, text, scale, bias, 0, chunk, True)
            n = image.shape[0]
            ds = (dq * image.float()).sum() / n  # ⟨G, q·kᵀ⟩/B from the unscaled dq
            s = scale.detach().float() / n
            ctx.save_for_backward(dq.mul_(s), dk.mul_(s), ds, gsum / n)
            ctx.meta = (image.dtype, text.dtype, scale.shape, scale.dtype, bias.shape, bias.dtype)
            return loss / n

        @staticmethod
        def backward(ctx, grad):
            dq, dk, ds, db = ctx.saved_tensors
            i_dt, t_dt, s_shape, s_dt, b_shape, b_dt = ctx.meta
            return ((dq * grad).to(i_dt), (dk * grad).to(t_dt), (ds * grad).reshape(s_shape).to(s_dt),
                    (db * grad).reshape(b_shape).to(b_dt))

    return (lambda i, t, s, b: Clip.apply(i, t, s)), Sig.apply


def naive_losses():
    import torch
    import torch.nn.functional as F

    def clip(image, text, scale, bias):
        logits = (scale * image @ text.T).float()
        labels = torch.arange(image.shape[0], device=image.device)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2

    def siglip(image, text, scale, bias):
        logits = (scale * image @ text.T + bias).float()
        labels = 2 * torch.eye(image.shape[0], device=image.device) - 1
        return -F.logsigmoid(labels * logits).sum() / image.shape[0]

    return clip, siglip


def loss_fn(kind: str, impl: str, chunk: int, tiles=None):
    """The loss function, or a string saying why the implementation cannot run."""
    if impl == "triton":
        return triton_losses(chunk, tiles)[kind == "siglip"]
    if impl == "chunked":
        from clipkit.losses.fused import fused_clip_loss, fused_siglip_loss
        if kind == "clip":
            return lambda i, t, s, b: fused_clip_loss(i, t, s, impl="chunked", chunk=None)
        return lambda i, t, s, b: fused_siglip_loss(i, t, s, b, impl="chunked", chunk=None)
    if impl == "open_clip":
        from open_clip.loss import ClipLoss, SigLipLoss
        module = ClipLoss() if kind == "clip" else SigLipLoss()
        return (lambda i, t, s, b: module(i, t, s)) if kind == "clip" else (lambda i, t, s, b: module(i, t, s, b))
    if impl == "compiled":
        import torch
        # A fresh dynamo state per row: the sweep has more shapes than dynamo's recompile
        # limit, past which it would silently fall back to eager.
        torch._dynamo.reset()
        return torch.compile(naive_losses()[kind == "siglip"], dynamic=False)
    if impl == "infcl":
        if kind != "clip":
            return "n/a (Inf-CL has no sigmoid loss)"
        try:
            from inf_cl import cal_inf_loss
        except ImportError:
            return "not installed (pip install inf-cl)"
        # scale multiplies q here, so Inf-CL's GradientGather (an all-reduce) is not involved.
        return lambda i, t, s, b: (cal_inf_loss(s * i, t) + cal_inf_loss(s * t, i)) / 2
    raise ValueError(impl)


def measure(fn, batch: int, dim: int, dtype: str, device: str, reps: int, warmup: int) -> dict:
    import torch
    import torch.nn.functional as F

    g = torch.Generator(device=device).manual_seed(0)
    tdt = getattr(torch, DTYPES[dtype])
    image = F.normalize(torch.randn(batch, dim, device=device, generator=g), dim=-1).to(tdt).requires_grad_()
    text = F.normalize(torch.randn(batch, dim, device=device, generator=g), dim=-1).to(tdt).requires_grad_()
    scale = torch.tensor(14.3, device=device, requires_grad=True)
    bias = torch.tensor(-10.0, device=device, requires_grad=True)
    cuda = device == "cuda"
    times, loss = [], None
    # Gradient buffers exist before the peak is reset: only the loss's own memory counts.
    image.grad, text.grad = torch.zeros_like(image), torch.zeros_like(text)
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    for step in range(warmup + reps):
        scale.grad = bias.grad = None
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        else:
            t0 = time.perf_counter()
        loss = fn(image, text, scale, bias)
        loss.backward()
        if cuda:
            end.record()
            torch.cuda.synchronize()
            elapsed = start.elapsed_time(end) / 1e3
        else:
            elapsed = time.perf_counter() - t0
        if step >= warmup:
            times.append(elapsed)
    peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else None
    return {"status": "ok", "median_s": statistics.median(times), "times_s": times, "peak_mb": peak_mb,
            "loss": float(loss.detach())}


def device_name(device: str) -> str:
    if device == "cuda":
        import torch
        return torch.cuda.get_device_name()
    return "CPU (Triton interpreter)"


def fmt_row(r: dict) -> str:
    head = f"{r['kind']:7} {r['dtype']:5} {r['dim']:>4} {r['batch']:>8} {r['impl']:10}"
    if r["status"] != "ok":
        return f"{head} {r['status']}"
    peak = f"{r['peak_mb']:>10.0f}" if r["peak_mb"] is not None else f"{'-':>10}"
    return (f"{head} {r['median_s'] * 1e3:>11.2f} {peak} {r['x_floor_4u']:>8.2f} "
            f"{r.get('x_floor_4u_measured', math.nan):>10.2f} {r['loss_rel_err_vs_open_clip']:>9.1e}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, nargs="+",
                   default=[4096, 8192, 16384, 32768, 65536, 131072, 262144, 524288, 1048576])
    p.add_argument("--dim", type=int, nargs="+", default=[512, 768])
    p.add_argument("--dtype", nargs="+", default=["bf16", "fp32"], choices=sorted(DTYPES))
    p.add_argument("--kinds", nargs="+", default=["clip", "siglip"], choices=["clip", "siglip"])
    p.add_argument("--impls", nargs="+", default=IMPLS, choices=IMPLS)
    p.add_argument("--chunk", type=int, default=16384,
                   help="columns per gradient block of the Triton path (capped at 2 GiB)")
    p.add_argument("--tiles", default=None, metavar="BM,BN,BK,WARPS,STAGES",
                   help="one tile config for every Triton kernel (default: per-kernel defaults), for tuning")
    p.add_argument("--compiled-max-batch", type=int, default=65536,
                   help="largest B for torch.compile'd naive (each B is a fresh 10-40 s compile)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--interpret", action="store_true",
                   help="run on CPU under TRITON_INTERPRET=1 (triton and open_clip only): checks the script")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "loss_bench_gpu.json"))
    args = p.parse_args(argv)

    import torch

    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"
        device, impls = "cpu", [i for i in args.impls if i in ("triton", "chunked", "open_clip")]
        warmup = 0
    else:
        if not torch.cuda.is_available():
            sys.exit("no CUDA device: run on a GPU machine, or pass --interpret for a CPU smoke run")
        device, impls, warmup = "cuda", args.impls, args.warmup
    tiles = None
    if args.tiles:
        from clipkit.kernels.triton_contrastive import TileConfig
        tiles = TileConfig(*map(int, args.tiles.split(",")))
    name = device_name(device)
    print(f"device: {name}; median of {args.reps} after {warmup} warm-up; torch {torch.__version__}", flush=True)
    measured = {dt: measured_gemm_flops(dt) if device == "cuda" else math.nan for dt in args.dtype}
    print("measured GEMM rate: " + ", ".join(f"{dt} {v / 1e12:.0f} TFLOP/s (datasheet {peak_flops(name, dt) / 1e12:.0f})"
                                             for dt, v in measured.items()), flush=True)
    rows = []
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def write(rows):  # after every group: a run cut short by a timeout keeps what it measured
        out.write_text(json.dumps({"device": name, "torch": torch.__version__, "reps": args.reps, "warmup": warmup,
                                   "chunk": args.chunk, "tiles": args.tiles, "peak_flops": PEAK_FLOPS,
                                   "measured_gemm_flops": measured, "rows": rows}, indent=2))

    for kind in args.kinds:
        for dtype in args.dtype:
            for dim in args.dim:
                dead: dict[str, str] = {}  # impl -> why larger B are skipped
                for batch in sorted(args.batch):
                    group = []
                    for impl in impls:
                        row = {"kind": kind, "impl": impl, "batch": batch, "dim": dim, "dtype": dtype}
                        fn = loss_fn(kind, impl, args.chunk, tiles)
                        if isinstance(fn, str):
                            row["status"] = fn
                        elif impl in dead:
                            row["status"] = dead[impl]
                        elif impl == "compiled" and batch > args.compiled_max_batch:
                            row["status"] = f"skipped (B > --compiled-max-batch {args.compiled_max_batch})"
                        else:
                            try:
                                row.update(measure(fn, batch, dim, dtype, device, args.reps, warmup))
                            except torch.OutOfMemoryError:
                                row["status"] = "OOM"
                                dead[impl] = f"skipped (OOM at B={batch})"
                            except Exception as err:  # a competitor's failure is a row, not the end of the run
                                row["status"] = f"error: {type(err).__name__}: {str(err).splitlines()[0][:120]}"
                                dead[impl] = f"skipped (error at B={batch})"
                            if device == "cuda":
                                torch.cuda.empty_cache()
                        group.append(row)
                    ref = next((r for r in group if r["impl"] == "open_clip" and r["status"] == "ok"), None)
                    floor = 4 * 2 * batch**2 * dim / peak_flops(name, dtype)
                    floor_measured = 4 * 2 * batch**2 * dim / measured[dtype]
                    for r in group:
                        if r["status"] == "ok":
                            r["x_floor_4u"] = r["median_s"] / floor if device == "cuda" else math.nan
                            r["x_floor_4u_measured"] = r["median_s"] / floor_measured if device == "cuda" else math.nan
                            r["loss_rel_err_vs_open_clip"] = (abs(r["loss"] - ref["loss"]) / abs(ref["loss"])
                                                              if ref else math.nan)
                        print("  " + fmt_row(r), flush=True)
                    rows += group
                    write(rows)
    print(f"\n{'loss':7} {'dtype':5} {'D':>4} {'B':>8} {'impl':10} {'fwd+bwd ms':>11} {'peak MB':>10} "
          f"{'x 4U':>8} {'x 4U meas':>10} {'rel err':>9}")
    for r in rows:
        print(fmt_row(r))
    write(rows)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
