"""The Triton kernels against the chunked path on a GPU: loss values and every gradient, several sizes.

    python benchmarks/triton_parity_gpu.py                     # on a GPU: float64, float32, bf16; ~1 min
    python benchmarks/triton_parity_gpu.py --interpret --sizes 1x8 67x33 200x64   # CPU smoke run (interpreter)

The CPU tests run the kernels only under Triton's interpreter (sizes <= 256, no bf16 `tl.dot`), so a
compiled kernel that is fast and wrong would pass them. Here, per size B x D, dtype and loss:

  truth    `clipkit.losses.fused` with impl=chunked in float64 on the same inputs (rounded to the
           dtype first, so the truth sees what the kernels see);
  triton   impl=triton in the dtype;  chunked  impl=chunked in the dtype (the yardstick of rounding).

Each row is the largest relative error, max|x - truth| / max(max|truth|, size of its terms), over
the loss and the gradients of image [B, D], text [B, D], the scale (and SigLIP's bias). A row passes when the Triton error is
within TOLERANCE[dtype], or within 10x the chunked path's own error in that dtype. CLIP runs at
scale 1/0.07 and 100 (the cap), SigLIP at scale 10 and bias -10; each with the default gradient
block and a narrow one (`--chunk`, several column blocks). One more case per dtype calls the block
primitives directly with a row offset (a rank's block of a larger batch; SigLIP also without
positives). Prints one line per row; writes JSON to --out; exits 1 if a row fails.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

DEFAULT_SIZES = ["1x8", "127x33", "1000x512", "4097x768", "16384x512"]
# Relative error a dtype's Triton path may show against float64 truth. float32: exact-fp32 dots
# ("ieee") and float32 cuBLAS products over D, B terms; bf16: the gradient block G is rounded to
# bf16 before its products (as flash-attention rounds dS), about 2^-8 relative per entry.
TOLERANCE = {"float64": 1e-9, "float32": 2e-4, "bfloat16": 3e-2}


def features(n: int, d: int, seed: int, device: str):
    """[n, D] image and text features, unit rows, text i correlated with image i (float64)."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator(device="cpu").manual_seed(seed)
    text = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    image = F.normalize(text + 0.8 * F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1), dim=-1)
    return image.to(device), text.to(device)


def rel_err(x, truth, floor: float) -> float:
    """max|x - truth| / max(max|truth|, floor). `floor` is the size of the terms the value is made
    of (for the loss, the logits' scale s), so that a value that cancels to near 0 (the CLIP loss
    at s = 100 is about 1e-9, made of log-sum-exps near 100) is judged by its terms' rounding."""
    x, truth = x.double().reshape(-1), truth.double().reshape(-1)
    return float((x - truth).abs().max() / max(float(truth.abs().max()), floor))


def run_loss(kind: str, impl: str, image, text, scale: float, bias: float, chunk: int | None, dtype):
    """(loss, d_image, d_text, d_scale, d_bias or None) of one fused loss call; inputs cast to `dtype`,
    scale and bias as float32 parameters (float64 when dtype is float64), as in training."""
    import torch

    from clipkit.losses.fused import fused_clip_loss, fused_siglip_loss

    pdt = torch.float64 if dtype == torch.float64 else torch.float32
    i = image.to(dtype).detach().requires_grad_()
    t = text.to(dtype).detach().requires_grad_()
    s = torch.tensor([scale], dtype=pdt, device=image.device, requires_grad=True)
    b = torch.tensor([bias], dtype=pdt, device=image.device, requires_grad=True)
    if kind == "clip":
        loss = fused_clip_loss(i, t, s, impl=impl, chunk=chunk)
    else:
        loss = fused_siglip_loss(i, t, s, b, impl=impl, chunk=chunk)
    loss.backward()
    return loss.detach(), i.grad, t.grad, s.grad, (b.grad if kind == "siglip" else None)


def loss_rows(batch: int, dim: int, dtype_name: str, device: str, chunk: int) -> list[dict]:
    import torch

    dtype = getattr(torch, dtype_name)
    image, text = features(batch, dim, seed=batch + dim, device=device)
    # The truth sees the inputs as the kernels do: rounded to the dtype, then exact.
    image, text = image.to(dtype).double(), text.to(dtype).double()
    rows = []
    for kind, scale, bias in (("clip", 1 / 0.07, 0.0), ("clip", 100.0, 0.0), ("siglip", 10.0, -10.0)):
        for ch in (None, chunk):
            truth = run_loss(kind, "chunked", image, text, scale, bias, ch, torch.float64)
            tri = run_loss(kind, "triton", image, text, scale, bias, ch, dtype)
            ref = run_loss(kind, "chunked", image, text, scale, bias, ch, dtype)
            names = ("loss", "d_image", "d_text", "d_scale", "d_bias")
            # Term sizes: the loss ~ s + |b|; a feature gradient row ~ s/B; the scale and bias gradients ~ 1.
            floors = (scale + abs(bias), scale / batch, scale / batch, 1.0, 1.0)
            errs = {n: (rel_err(x, y, f), rel_err(r, y, f))
                    for n, x, r, y, f in zip(names, tri, ref, truth, floors) if y is not None}
            rows.append(row(f"{kind} s={scale:.3g}" + (f" b={bias:g}" if kind == "siglip" else ""), batch, dim,
                            dtype_name, ch, errs, float(truth[0])))
    return rows


def block_rows(batch: int, dim: int, dtype_name: str, device: str, chunk: int) -> list[dict]:
    """The primitives on rows [offset, offset + b) of a B-row batch, against chunked float64."""
    import torch

    from clipkit.kernels import chunked_contrastive as ck
    from clipkit.kernels import triton_contrastive as tk

    dtype = getattr(torch, dtype_name)
    image, text = features(batch, dim, seed=7, device=device)
    b, offset = batch // 3, batch // 3
    q, k = image[offset:offset + b].to(dtype), text.to(dtype)
    q64, k64 = q.double(), k.double()
    scale = torch.tensor([1 / 0.07], dtype=torch.float64, device=device)
    bias = torch.tensor([-10.0], dtype=torch.float64, device=device)

    def params(qq):  # float32 parameters for float32/bf16 features, as in training
        pdt = torch.float64 if qq.dtype == torch.float64 else torch.float32
        return scale.to(pdt), bias.to(pdt)

    def infonce(mod, qq, kk):
        s, _ = params(qq)
        row_lse, ref, col_sum, pos = mod.infonce_block_stats(qq, kk, s, offset, chunk)
        col_lse = ref + col_sum.log()
        dq, dk = mod.infonce_block_grads(qq, kk, s, offset, row_lse, col_lse, chunk, need_q=True, need_k=True)
        return row_lse, col_lse, pos, dq, dk

    def sigmoid(mod, qq, kk, off):
        return mod.sigmoid_block(qq, kk, *params(qq), off, chunk, need_grads=True)

    rows = []
    s = float(scale)
    cases = (("infonce block", infonce, ("row_lse", "col_lse", "positives", "dq", "dk"), (s, s, s * b, 1.0, 1.0)),
             ("sigmoid block", lambda m, qq, kk: sigmoid(m, qq, kk, offset), ("loss", "dq", "dk", "grad_sum"),
              (1.0,) * 4),
             ("sigmoid no-pos", lambda m, qq, kk: sigmoid(m, qq, kk, None), ("loss", "dq", "dk", "grad_sum"),
              (1.0,) * 4))
    for label, fn, names, floors in cases:
        truth, tri, ref = fn(ck, q64, k64), fn(tk, q, k), fn(ck, q, k)
        errs = {n: (rel_err(x, y, f), rel_err(r, y, f)) for n, x, r, y, f in zip(names, tri, ref, truth, floors)}
        rows.append(row(f"{label} {b}/{batch}@{offset}", batch, dim, dtype_name, chunk, errs, math.nan))
    return rows


def row(case: str, batch: int, dim: int, dtype: str, chunk: int | None, errs: dict, loss: float) -> dict:
    tri = max(e[0] for e in errs.values())
    ref = max(e[1] for e in errs.values())
    ok = tri <= TOLERANCE[dtype] or tri <= 10 * ref
    return {"case": case, "batch": batch, "dim": dim, "dtype": dtype, "chunk": chunk, "loss": loss,
            "triton_err": tri, "chunked_err": ref, "worst": max(errs, key=lambda n: errs[n][0]),
            "errors": {n: {"triton": e[0], "chunked": e[1]} for n, e in errs.items()}, "pass": ok}


def fmt(r: dict) -> str:
    chunk = "auto" if r["chunk"] is None else r["chunk"]
    return (f"{'ok  ' if r['pass'] else 'FAIL'} {r['dtype']:8} {r['batch']:>6}x{r['dim']:<4} {r['case']:28} "
            f"chunk {chunk!s:>5}  triton {r['triton_err']:.1e} ({r['worst']})  chunked {r['chunked_err']:.1e}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=DEFAULT_SIZES, help="BxD")
    p.add_argument("--dtypes", nargs="+", default=["float64", "float32", "bfloat16"], choices=sorted(TOLERANCE))
    p.add_argument("--chunk", type=int, default=256, help="the narrow gradient block (columns; rows for chunked)")
    p.add_argument("--interpret", action="store_true", help="CPU tensors under TRITON_INTERPRET=1 (keep B <= 256)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "triton_parity_gpu.json"))
    args = p.parse_args(argv)
    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    if args.interpret:
        device, name = "cpu", "CPU (Triton interpreter)"
    elif torch.cuda.is_available():
        device, name = "cuda", torch.cuda.get_device_name()
        # The chunked yardstick's products in exact float32, like the kernels' dots.
        torch.backends.cuda.matmul.allow_tf32 = False
    else:
        print("no CUDA device: run on a GPU machine, or pass --interpret for a CPU smoke run", file=sys.stderr)
        return 2
    print(f"device: {name}; torch {torch.__version__}; tolerance {TOLERANCE}", flush=True)
    rows, start = [], time.time()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def write():  # after every size: a run cut short by a timeout keeps its rows
        out.write_text(json.dumps({"device": name, "torch": torch.__version__, "tolerance": TOLERANCE, "rows": rows},
                                  indent=2))

    for dtype in args.dtypes:
        for size in args.sizes:
            batch, dim = map(int, size.lower().split("x"))
            new = loss_rows(batch, dim, dtype, device, args.chunk)
            if batch >= 6:
                new += block_rows(batch, dim, dtype, device, args.chunk)
            for r in new:
                print(fmt(r), flush=True)
            rows += new
            write()
    failed = [r for r in rows if not r["pass"]]
    print(f"parity: {len(rows) - len(failed)}/{len(rows)} rows pass in {time.time() - start:.0f} s"
          + (f"; FAILED: {len(failed)}" if failed else ""))
    write()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
