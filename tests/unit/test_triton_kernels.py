"""Triton contrastive block primitives under TRITON_INTERPRET=1 against float64 materialized math.

The interpreter runs the same kernels as the GPU on CPU tensors (about 1,700× slower), so
sizes stay ≤ 256. The env var is set per test (not at import) so it never leaks into other
test modules; the kernels module keeps interpreted and compiled kernels apart by itself.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss as OpenClipLoss
from open_clip.loss import SigLipLoss as OpenSigLipLoss

from clipkit.kernels import triton_contrastive
from clipkit.kernels.triton_contrastive import (
    TileConfig,
    infonce_block_grads,
    infonce_block_stats,
    sigmoid_block,
    triton_available,
)

F64 = torch.float64
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def features(n: int, d: int, seed: int, dtype=F64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=F64), dim=-1).to(dtype)


def pair(b: int, big_b: int, d: int, offset: int, seed: int, dtype=F64):
    """Rows q (a block of the batch) and all columns k, positives correlated with their rows."""
    k = features(big_b, d, seed, F64)
    q = F.normalize(k[offset:offset + b] + 0.8 * features(b, d, seed + 1), dim=-1)
    return q.to(dtype), k.to(dtype)


def logits64(q, k, s, bias=0.0):
    return s * q.double() @ k.double().T + bias


def positives(b: int, offset: int):
    return torch.arange(b), torch.arange(b) + offset


def ref_stats(q, k, s, offset):
    lg = logits64(q, k, s)
    col_max = lg.amax(0)
    return lg.logsumexp(1), col_max, (lg - col_max).exp().sum(0), lg[positives(q.shape[0], offset)].sum()


def ref_infonce_grads(q, k, s, offset):
    lg = logits64(q, k, s)
    # col_lse of the block alone: the reference treats the block as the whole row set.
    g = (lg - lg.logsumexp(1, keepdim=True)).exp() + (lg - lg.logsumexp(0, keepdim=True)).exp()
    g[positives(q.shape[0], offset)] -= 2
    return g @ k.double(), g.T @ q.double(), lg.logsumexp(1), lg.logsumexp(0)


def ref_sigmoid(q, k, s, bias, offset):
    lg = logits64(q, k, s, bias)
    y = -torch.ones_like(lg)
    y[positives(q.shape[0], offset)] = 1
    g = torch.sigmoid(lg) - (y > 0).double()
    return F.softplus(-y * lg).sum(), g @ k.double(), g.T @ q.double(), g.sum()


# (b, B, D, row_offset, tiles, chunk): rows = the whole batch or a rank's block, odd sizes,
# D not a power of two, B below one tile, several row groups (the partials' read-modify-write)
# and column splits, gradient blocks narrower than B.
CASES = {
    "one_process_odd": (37, 37, 33, 0, TileConfig(16, 16, 16, row_groups=2, col_splits=2), 20),
    "rank_block": (50, 203, 100, 100, TileConfig(32, 64, 32, row_groups=1, col_splits=3), 64),
    "last_rank": (40, 120, 20, 80, TileConfig(16, 32, 16, row_groups=3, col_splits=1), 50),
    "b_below_one_tile": (5, 5, 7, 0, None, 4096),
    "default_tiles": (256, 256, 48, 0, None, 100),
}


def tol(dtype):
    return dict(rtol=1e-12, atol=1e-12) if dtype == F64 else dict(rtol=2e-6, atol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("case", list(CASES))
def test_infonce_stats_and_grads_match_float64(case, dtype):
    b, big_b, d, offset, tiles, chunk = CASES[case]
    q, k = pair(b, big_b, d, offset, seed=len(case), dtype=dtype)
    s = torch.tensor([100.0 if case == "rank_block" else 14.3], dtype=F64)
    row_lse, col_max, col_sumexp, pos = infonce_block_stats(q, k, s, offset, chunk, tiles=tiles)
    for got, want in zip((row_lse, col_max, col_sumexp, pos), ref_stats(q, k, s, offset)):
        assert got.dtype == (F64 if dtype == F64 else torch.float32)
        torch.testing.assert_close(got.double(), want, **tol(dtype))
    want_dq, want_dk, want_row, want_col = ref_infonce_grads(q, k, s, offset)
    col_lse = col_max + col_sumexp.log()
    torch.testing.assert_close(col_lse.double(), want_col, **tol(dtype))
    dq, dk = infonce_block_grads(q, k, s, offset, row_lse, col_lse, chunk, True, True, tiles=tiles)
    torch.testing.assert_close(dq.double(), want_dq, **tol(dtype))
    torch.testing.assert_close(dk.double(), want_dk, **tol(dtype))


def test_int64_index_path(monkeypatch):
    """Tensors past 2^31 elements switch the kernels to int64 offsets; forced here at small sizes."""
    monkeypatch.setattr(triton_contrastive, "_INT32_LIMIT", 100)
    b, big_b, d, offset, tiles, chunk = CASES["rank_block"]
    q, k = pair(b, big_b, d, offset, seed=11, dtype=torch.float32)
    s = torch.tensor(20.0)
    stats = infonce_block_stats(q, k, s, offset, chunk, tiles=tiles)
    for got, want in zip(stats, ref_stats(q, k, 20.0, offset)):
        torch.testing.assert_close(got.double(), want, rtol=2e-6, atol=2e-5)
    want_dq, want_dk, _, _ = ref_infonce_grads(q, k, 20.0, offset)
    dq, dk = infonce_block_grads(q, k, s, offset, stats[0], stats[1] + stats[2].log(), chunk, True, True, tiles=tiles)
    torch.testing.assert_close(dq.double(), want_dq, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(dk.double(), want_dk, rtol=2e-5, atol=2e-5)
    loss = sigmoid_block(q, k, s, torch.tensor(-10.0), offset, chunk, False, tiles=tiles)[0]
    torch.testing.assert_close(loss.double(), ref_sigmoid(q, k, 20.0, -10.0, offset)[0], rtol=2e-6, atol=0)


@pytest.mark.parametrize("scale,bias", [(10.0, -10.0), (100.0, -10.0), (1.0, 2.0)])
@pytest.mark.parametrize("case", ["one_process_odd", "rank_block", "b_below_one_tile"])
def test_sigmoid_block_matches_float64(case, scale, bias):
    b, big_b, d, offset, tiles, chunk = CASES[case]
    q, k = pair(b, big_b, d, offset, seed=3, dtype=torch.float32)
    s, beta = torch.tensor(scale), torch.tensor([bias])
    loss, dq, dk, gsum = sigmoid_block(q, k, s, beta, offset, chunk, True, tiles=tiles)
    want = ref_sigmoid(q, k, scale, bias, offset)
    # With β = −10 the ~b·B negatives each add ≈ 4.5e-5: the loss is a sum of tiny terms,
    # which the log1p form keeps to float32 relative accuracy.
    torch.testing.assert_close(loss.double(), want[0], rtol=2e-6, atol=0)
    torch.testing.assert_close(dq.double(), want[1], rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(dk.double(), want[2], rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(gsum.double(), want[3], rtol=2e-6, atol=2e-5)
    alone = sigmoid_block(q, k, s, beta, offset, chunk, False, tiles=tiles)
    assert alone[1:] == (None, None, None)
    torch.testing.assert_close(alone[0], loss)


@pytest.mark.parametrize("case", ["rank_block", "b_below_one_tile"])
def test_sigmoid_block_without_positives(case):
    """row_offset=None (another rank's texts in SigLIP's ring): y = −1 for every pair."""
    b, big_b, d, _, tiles, chunk = CASES[case]
    q, k = pair(b, big_b, d, 0, seed=4, dtype=torch.float32)
    s, beta = torch.tensor(10.0), torch.tensor(-10.0)
    loss, dq, dk, gsum = sigmoid_block(q, k, s, beta, None, chunk, True, tiles=tiles)
    lg = logits64(q, k, 10.0, -10.0)
    g = torch.sigmoid(lg)
    torch.testing.assert_close(loss.double(), F.softplus(lg).sum(), rtol=2e-6, atol=0)
    torch.testing.assert_close(dq.double(), g @ k.double(), rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(dk.double(), g.T @ q.double(), rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(gsum.double(), g.sum(), rtol=2e-6, atol=2e-5)


def test_sigmoid_float64_is_exact():
    q, k = pair(30, 70, 33, 40, seed=9)
    got = sigmoid_block(q, k, torch.tensor(100.0, dtype=F64), torch.tensor(-10.0, dtype=F64), 40, 32, True,
                        tiles=TileConfig(16, 32, 32))
    for a, b in zip(got, ref_sigmoid(q, k, 100.0, -10.0, 40)):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("need_q,need_k", [(True, False), (False, True), (False, False)])
def test_grads_form_only_what_is_asked(need_q, need_k):
    q, k = pair(20, 45, 17, 25, seed=4, dtype=torch.float32)
    s = torch.tensor(30.0)
    want_dq, want_dk, row_lse, col_lse = ref_infonce_grads(q, k, 30.0, 25)
    dq, dk = infonce_block_grads(q, k, s, 25, row_lse.float(), col_lse.float(), 16, need_q, need_k,
                                 tiles=TileConfig(16, 16, 16))
    assert (dq is None) != need_q and (dk is None) != need_k
    if need_q:  # the lse rounded to fp32 moves each G_ij by ~s·2^-24 of itself
        torch.testing.assert_close(dq.double(), want_dq, rtol=2e-5, atol=2e-5)
    if need_k:
        torch.testing.assert_close(dk.double(), want_dk, rtol=2e-5, atol=2e-5)


def test_rank_blocks_compose_into_the_global_batch():
    """What the distributed scheme does with these primitives: per-rank stats, an all-reduce
    of the column (max, sum), per-rank grads with the global col_lse, dk summed over ranks."""
    big_b, d, ranks = 60, 24, 3
    q_all, k = pair(big_b, big_b, d, 0, seed=5, dtype=torch.float32)
    s, b, tiles = torch.tensor(10.0), big_b // ranks, TileConfig(16, 16, 16, row_groups=2)
    stats = [infonce_block_stats(q_all[r * b:(r + 1) * b], k, s, r * b, 0, tiles=tiles) for r in range(ranks)]
    col_max = torch.stack([st[1] for st in stats]).amax(0)
    col_sum = sum(st[2] * (st[1] - col_max).exp() for st in stats)
    col_lse = col_max + col_sum.log()
    row_lse = torch.cat([st[0] for st in stats])
    loss = (row_lse.sum() + col_lse.sum() - 2 * sum(st[3] for st in stats)) / (2 * big_b)
    grads = [infonce_block_grads(q_all[r * b:(r + 1) * b], k, s, r * b, stats[r][0], col_lse, 16, True, True,
                                 tiles=tiles) for r in range(ranks)]
    want_dq, want_dk, _, _ = ref_infonce_grads(q_all, k, 10.0, 0)
    ref = OpenClipLoss()(q_all.double(), k.double(), torch.tensor(10.0, dtype=F64))
    torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(torch.cat([g[0] for g in grads]).double(), want_dq, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(sum(g[1] for g in grads).double(), want_dk, rtol=2e-6, atol=2e-6)


class _TritonClip(torch.autograd.Function):
    """Single-process CLIP loss from the primitives (what the lead's Function does)."""

    @staticmethod
    def forward(ctx, q, k, s):
        row_lse, col_max, col_sumexp, pos = infonce_block_stats(q, k, s, 0, 32, tiles=TileConfig(32, 32, 32))
        col_lse = col_max + col_sumexp.log()
        ctx.save_for_backward(q, k, s, row_lse, col_lse)
        return (row_lse.sum() + col_lse.sum() - 2 * pos) / (2 * q.shape[0])

    @staticmethod
    def backward(ctx, grad):
        q, k, s, row_lse, col_lse = ctx.saved_tensors
        dq, dk = infonce_block_grads(q, k, s, 0, row_lse, col_lse, 32, True, True, tiles=TileConfig(32, 32, 32))
        coef = grad / (2 * q.shape[0])
        return dq * s * coef, dk * s * coef, ((dq * q).sum() * coef).reshape(s.shape)


def test_primitives_give_open_clip_loss_and_every_gradient():
    """d/dq = s·dq/(2B) and d/ds = Σ q·dq/(2B): the contract's scaling, against open_clip autograd."""
    q, k = pair(45, 45, 40, 0, seed=6)
    s = torch.tensor([20.0], dtype=F64)
    leaves = [t.clone().requires_grad_() for t in (q, k, s)]
    got = _TritonClip.apply(*leaves)
    got_grads = torch.autograd.grad(got, leaves)
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, s)]
    want = OpenClipLoss()(*ref_leaves)
    for a, b in zip((got, *got_grads), (want, *torch.autograd.grad(want, ref_leaves))):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-13)
    # SigLIP: loss_sum/B and grad_sum/B for the bias, against open_clip's SigLipLoss.
    beta = torch.tensor([-10.0], dtype=F64)
    loss, dq, dk, gsum = sigmoid_block(q, k, s, beta, 0, 16, True, tiles=TileConfig(16, 16, 16))
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, s, beta)]
    want = OpenSigLipLoss()(*ref_leaves)
    want_grads = torch.autograd.grad(want, ref_leaves)
    n = q.shape[0]
    for a, b in zip((loss / n, dq * s / n, dk * s / n, (dq * q).sum() / n, gsum / n), (want, *want_grads)):
        torch.testing.assert_close(a.reshape(b.shape), b, rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_identical_features_give_ln_b(dtype):
    big_b = 13
    x = F.normalize(torch.ones(big_b, 5, dtype=dtype), dim=-1)
    row_lse, col_max, col_sumexp, pos = infonce_block_stats(x, x, torch.tensor(100.0), 0, 8,
                                                            tiles=TileConfig(16, 16, 16))
    loss = (row_lse.sum() + (col_max + col_sumexp.log()).sum() - 2 * pos) / (2 * big_b)
    assert math.isclose(float(loss), math.log(big_b), rel_tol=1e-12 if dtype == F64 else 1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_accumulate_in_fp32(dtype):
    """16-bit features: statistics to fp32 accuracy of the rounded inputs' fp64 math; gradients
    through a bf16 gradient block (the interpreter truncates to bf16, so ~2^-7 relative)."""
    q, k = pair(48, 80, 64, 16, seed=7, dtype=dtype)
    s, tiles = torch.tensor(50.0), TileConfig(16, 32, 32, row_groups=2)
    stats = infonce_block_stats(q, k, s, 16, 32, tiles=tiles)
    for got, want in zip(stats, ref_stats(q, k, 50.0, 16)):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)
    want_dq, want_dk, row_lse, col_lse = ref_infonce_grads(q, k, 50.0, 16)
    dq, dk = infonce_block_grads(q, k, s, 16, row_lse.float(), col_lse.float(), 32, True, True, tiles=tiles)
    for got, want in ((dq, want_dq), (dk, want_dk)):
        assert got.dtype == torch.float32
        assert (got.double() - want).norm() / want.norm() < 1e-2
    loss, dq, dk, gsum = sigmoid_block(q, k, s, torch.tensor(-10.0), 16, 32, True, tiles=tiles)
    want = ref_sigmoid(q, k, 50.0, -10.0, 16)
    torch.testing.assert_close(loss.double(), want[0], rtol=1e-5, atol=0)
    torch.testing.assert_close(gsum.double(), want[3], rtol=1e-5, atol=1e-4)
    for got, ref in ((dq, want[1]), (dk, want[2])):
        assert (got.double() - ref).norm() / ref.norm() < 1e-2


def test_auto_chunk_is_the_default_gradient_block_width():
    """chunk=None (loss.chunk_size=auto): DEFAULT_GRAD_WIDTH columns, rounded and capped like a
    chunk given explicitly (the chunked kernels' row budget does not apply here)."""
    width, default = triton_contrastive._block_width, triton_contrastive.DEFAULT_GRAD_WIDTH
    assert width(16384, 65536, None, 2, 128) == width(16384, 65536, default, 2, 128) == 4096
    assert width(8, 100, None, 4, 64) == 100


def test_bad_inputs_raise_clear_errors(monkeypatch):
    q, k = pair(4, 8, 16, 0, seed=8, dtype=torch.float32)
    s = torch.tensor(10.0)
    with pytest.raises(ValueError, match="row_offset"):
        infonce_block_stats(q, k, s, 5, 8)
    with pytest.raises(TypeError, match="share dtype"):
        infonce_block_stats(q, k.double(), s, 0, 8)
    with pytest.raises(TypeError, match="float32/bfloat16"):
        infonce_block_stats(q.int(), k.int(), s, 0, 8)
    with pytest.raises(ValueError, match=r"\[b, D\]"):
        sigmoid_block(q, k[:, :3], s, s, 0, 8, False)
    with pytest.raises(ValueError, match="tile sizes"):
        infonce_block_stats(q, k, s, 0, 8, tiles=TileConfig(24, 16, 16))
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        infonce_block_stats(q, k, s, 0, 8)


def test_triton_available(monkeypatch):
    assert triton_available("cpu")
    assert triton_available(torch.device("cuda")) == (torch.cuda.is_available()
                                                      and torch.cuda.get_device_capability()[0] >= 8)
    assert not triton_available("meta")
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not triton_available("cpu")


def _sm90_compile(fn, signature: dict, constexprs: dict, tiles: TileConfig, workdir: Path) -> tuple[str, int]:
    """Compiles one kernel for an H100 (sm_90) through triton's own pipeline, no GPU needed;
    returns its PTX and the spill-store bytes ptxas reports. Pointers and sizes are marked
    16-divisible as at real sizes (what turns on vectorized loads and cp.async pipelining)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sized = {"D", "stride_q", "stride_k", "stride_g", "n_rows", "n_cols", "n"}
    attrs = {(i,): [["tt.divisibility", 16]] for i, (name, ty) in enumerate(signature.items())
             if ty.startswith("*") or name in sized}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                            options=dict(num_warps=tiles.num_warps, num_stages=tiles.num_stages))
    ptx_file = workdir / f"{fn.__name__}.ptx"
    ptx_file.write_text(kernel.asm["ptx"])
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    report = subprocess.run([str(ptxas), "-arch=sm_90a", "-v", str(ptx_file), "-o", str(workdir / "out.cubin")],
                            capture_output=True, text=True, check=True).stderr
    return kernel.asm["ptx"], sum(int(n) for n in re.findall(r"(\d+) bytes spill stores", report))


def test_bf16_kernels_compile_for_h100_without_spills(monkeypatch, tmp_path):
    """The GPU path, checked without a GPU: every bf16 kernel at its default tiles lowers to
    sm_90 PTX with wgmma and assembles with no register spills."""
    import triton.language as tl

    monkeypatch.delenv("TRITON_INTERPRET")
    pytest.importorskip("triton.backends.nvidia.compiler")
    kern = triton_contrastive._kernels()
    gpu_bf16 = SimpleNamespace(is_cuda=True, dtype=torch.bfloat16)
    f32 = "*fp32"
    common_sig = {"q_ptr": "*bf16", "k_ptr": "*bf16", "scale_ptr": f32}
    sizes = {"n_rows": "i32", "n_cols": "i32", "D": "i32"}
    kernels = {
        "stats": (kern.infonce_stats_kernel, {**common_sig, "row_m_ptr": f32, "row_s_ptr": f32, "col_m_ptr": f32,
                                              "col_s_ptr": f32, "pos_ptr": f32, **sizes, "row_offset": "i32",
                                              "stride_q": "i32", "stride_k": "i32", "n_row_tiles": "i32",
                                              "tiles_per_split": "i32"}, {}),
        "grad": (kern.infonce_grad_kernel, {**common_sig, "row_lse2_ptr": f32, "col_lse2_ptr": f32, "g_ptr": "*bf16",
                                            **sizes, "diag_offset": "i32", "stride_q": "i32", "stride_k": "i32",
                                            "stride_g": "i32"}, {}),
        "sigmoid": (kern.sigmoid_kernel, {**common_sig, "bias_ptr": f32, "g_ptr": "*bf16", "loss_ptr": f32,
                                          "gsum_ptr": f32, **sizes, "diag_offset": "i32", "stride_q": "i32",
                                          "stride_k": "i32", "stride_g": "i32"}, {"WRITE_G": True}),
    }
    for name, (fn, sig, extra) in kernels.items():
        tiles = triton_contrastive._default_tiles(gpu_bf16, name)
        consts = dict(BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, EVEN_K=True,
                      UPCAST=False, ACC=tl.float32, PRECISION="ieee", WIDE=False, **extra)
        sig = {**sig, **{key: "constexpr" for key in consts}}
        ptx, spilled = _sm90_compile(fn, sig, consts, tiles, tmp_path)
        assert "wgmma.mma_async" in ptx and "cp.async" in ptx, name  # tensor cores, pipelined loads
        assert spilled == 0, name
    merge_sig = {"m_ptr": f32, "s_ptr": f32, "out_m_ptr": f32, "out_s_ptr": f32, "n": "i32", "n_parts": "i32",
                 "BLOCK": "constexpr", "ACC": "constexpr"}
    _, spilled = _sm90_compile(kern.merge_max_sum_kernel, merge_sig, {"BLOCK": 1024, "ACC": tl.float32},
                               TileConfig(num_warps=4, num_stages=1), tmp_path)
    assert spilled == 0


def test_gpu_benchmark_runs_under_the_interpreter(tmp_path, capsys):
    """benchmarks/loss_bench_gpu.py end to end on the interpreter path (its GPU rows need a GPU)."""
    spec = importlib.util.spec_from_file_location("loss_bench_gpu", REPO / "benchmarks" / "loss_bench_gpu.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    bench.main(["--interpret", "--batch", "64", "--dim", "32", "--dtype", "fp32", "bf16", "--reps", "1",
                "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    by = {(r["kind"], r["dtype"], r["impl"]): r for r in rows}
    for kind in ("clip", "siglip"):
        assert by[(kind, "fp32", "open_clip")]["status"] == "ok"
        # bf16: open_clip rounds its logits to bf16, the kernels keep them in fp32.
        for dtype, rtol in (("fp32", 1e-5), ("bf16", 2e-2)):
            row = by[(kind, dtype, "triton")]
            assert row["status"] == "ok" and row["loss_rel_err_vs_open_clip"] < rtol
    assert "triton" in capsys.readouterr().out
