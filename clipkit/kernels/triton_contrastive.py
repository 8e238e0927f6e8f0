"""Triton kernels for exact CLIP (softmax InfoNCE) and SigLIP (pairwise sigmoid) losses.

Three block primitives on a block of rows of the global [B, B] logits l = s·q·kᵀ (+β),
the same contract as the chunked PyTorch ones, for `loss.impl=triton`: `q` [b, D] holds
this block's rows, `k` [B, D] every column, and row i's positive is column i + row_offset.
They are plain forward computations (no autograd); all return float32 (float64 for
float64 inputs) and never hold the [b, B] logits.

    infonce_block_stats  -> row_lse [b], col_max [B], col_sumexp [B], positive_sum
    infonce_block_grads  -> dq = G·k [b, D], dk = Gᵀ·q [B, D],
                            G = exp(l − row_lse) + exp(l − col_lse) − 2·[j = i + row_offset]
    sigmoid_block        -> Σ softplus(−y·l), dq, dk, Σ G with G = σ(l) − [y = +1]

Algorithm and cost, counted in b×B×D matmuls:
  * Stats (1): one fused kernel, flash-attention style. Program (p, s) of a
    (P row groups × S column splits) grid walks row tiles p, p+P, ... and, for each, the
    column tiles of split s, keeping the row's online log-sum-exp in registers. The column
    max/sum of every tile is merged into that program's own column partials [P, B] (a
    read-modify-write nobody else touches: no atomics, deterministic); a small kernel then
    folds the P partials (and the S row partials). P·S ≈ 2 programs per SM; S > 1 only
    when there are too few row tiles to fill the GPU.
  * Grads (3): for each block of `width` columns, a kernel recomputes the logits and writes
    the gradient block G [b, width] (bf16 for 16-bit inputs, as flash-attention rounds its
    dS before the tensor-core product; fp32/fp64 otherwise), then cuBLAS forms
    dq += G·k_block and dk_block = Gᵀ·q with float32 output. Fusing those two products
    into the kernel is what the D of CLIP rules out: a [tile, D] float32 accumulator with
    D = 512–768 does not fit in registers, and accumulating it in memory (atomics or a
    split with per-program partials) costs more traffic per FLOP than writing G once in
    bf16 (6 bytes per logit against 6·D FLOP of tensor-core work on it).
    Each column block after the first re-reads and re-writes dq [b, D] in float32, so
    wider blocks (`chunk` ≥ 4096 on a GPU) amortize that traffic.
    CLIP fwd+bwd = 4 b×B×D matmuls; open_clip's ClipLoss does 6 and Inf-CL about 10.
  * Sigmoid (3 with gradients, 1 without): the grads kernel with the loss in its
    epilogue, then the same two cuBLAS products. Per-program loss/Σ G partials, summed
    on the host: no atomics anywhere, so every result is deterministic.

Memory beyond inputs and outputs (B = 1M, D = 512, bf16 in parentheses):
  * stats: column partials 2·P·B floats with P ≤ min(2·SMs, PARTIAL_BYTES / (8·B)),
    so ≤ max(PARTIAL_BYTES = 2 GiB, 8·B bytes) (2 GiB), plus row partials 2·S·b floats;
  * grads/sigmoid: the gradient block b × width with width ≤ `chunk` and
    b·width·itemsize ≤ max(GRAD_BLOCK_BYTES = 2 GiB, b·BLOCK_N·itemsize) (2 GiB at
    width 1024); fp16 inputs also get bf16 copies of q and k, since cuBLAS needs G and
    its operand in one dtype and fp16 holds probabilities below 6e-5 only as subnormals.

`chunk` is the column width of the gradient block (rounded down to the tile width); the
stats pass ignores it. `chunk=None` (`loss.chunk_size=auto`) takes `DEFAULT_GRAD_WIDTH`
columns: the chunked kernels' row budget would narrow the block, and with it the reuse of
dq, as B grows. Inputs: float32, bfloat16, float16 or float64 (float64 computes
in float64). Dot products of float32 inputs use `FP32_DOT_PRECISION` ("ieee": exact fp32,
no TF32) in the kernels; the cuBLAS products follow torch.backends.cuda.matmul.allow_tf32.
On CPU tensors the kernels run in Triton's interpreter, which needs TRITON_INTERPRET=1 in
the environment when they are called; there 16-bit inputs are upcast at load (the
interpreter cannot multiply bf16). This module imports nothing from
clipkit and imports triton only when a kernel first runs.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

LOG2E = 1.4426950408889634
PARTIAL_BYTES = 2 << 30
GRAD_BLOCK_BYTES = 2 << 30
DEFAULT_GRAD_WIDTH = 4096  # columns per gradient block for chunk=None (see the module docstring)
FP32_DOT_PRECISION = "ieee"
_INT32_LIMIT = 2**31 - 1  # element offsets past this need int64 index math in the kernels
_SUPPORTED = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@dataclass(frozen=True)
class TileConfig:
    """Tile sizes and launch shape; `None` lets the launcher choose from the device.

    block_m/block_n/block_k: powers of two ≥ 16. row_groups/col_splits: the stats grid
    (P, S) before clamping to the tile counts.
    """

    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    num_warps: int = 8
    num_stages: int = 3
    row_groups: int | None = None
    col_splits: int | None = None


def _default_tiles(x: torch.Tensor, kernel: str) -> TileConfig:
    """Per-kernel defaults for sm_90, chosen without a GPU: the largest tiles ptxas
    assembles with no register spills (128x128 loads 64 FLOP per byte from L2, 128x64 only
    43). Timings on an H100 may pick others: every primitive takes `tiles=`."""
    if not x.is_cuda:  # interpreter: bigger tiles are fewer numpy round trips
        return TileConfig(64, 64, 64, 4, 1)
    if x.dtype in (torch.bfloat16, torch.float16):
        # fp16's stats epilogue spills 24 bytes at 128x128 where bf16's does not.
        stats = TileConfig(128, 128, 64, 8, 3) if x.dtype == torch.bfloat16 else TileConfig(128, 64, 64, 4, 3)
        return {"stats": stats, "grad": TileConfig(128, 128, 64, 8, 3),
                "sigmoid": TileConfig(128, 64, 64, 8, 3)}[kernel]
    if x.dtype == torch.float32:
        return TileConfig(64, 64, 32, 4, 3)
    return TileConfig(32, 32, 16, 4, 2)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available(device: torch.device | str) -> bool:
    """Whether the kernels can run on `device`: a CUDA GPU (compute capability ≥ 8.0) with
    triton installed, or CPU tensors when TRITON_INTERPRET=1 is set (slow; for tests)."""
    device = torch.device(device)
    if importlib.util.find_spec("triton") is None:
        return False
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.get_device_capability(device)[0] >= 8
    return device.type == "cpu" and _interpreting()


_KERNELS: dict[bool, object] = {}


def _kernels():
    """The jit module for the current TRITON_INTERPRET (see _triton_contrastive_jit's docstring)."""
    mode = _interpreting()
    if mode not in _KERNELS:
        name = f"{__name__}_jit_{'interpret' if mode else 'compiled'}"
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("_triton_contrastive_jit.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        _KERNELS[mode] = module
    return _KERNELS[mode]


def _plain(fn):
    """No autograd and no autocast: the dtypes below are chosen, not inherited."""
    @functools.wraps(fn)
    def wrapped(q: torch.Tensor, *args, **kwargs):
        with torch.no_grad(), torch.autocast(q.device.type, enabled=False):
            return fn(q, *args, **kwargs)
    return wrapped


@dataclass(frozen=True)
class _Setup:
    cdt: torch.dtype  # accumulation/output dtype
    tiles: TileConfig
    consts: dict  # constexpr kernel arguments shared by the logit kernels


def _setup(q: torch.Tensor, k: torch.Tensor, row_offset: int, tiles: TileConfig | None, kernel: str) -> _Setup:
    if q.dim() != 2 or k.dim() != 2 or q.shape[1] != k.shape[1]:
        raise ValueError(f"q must be [b, D] and k [B, D], got {tuple(q.shape)} and {tuple(k.shape)}")
    if q.dtype != k.dtype or q.device != k.device:
        raise TypeError(f"q and k must share dtype and device, got {q.dtype}/{q.device} and {k.dtype}/{k.device}")
    if q.dtype not in _SUPPORTED:
        raise TypeError(f"triton contrastive kernels take float32/bfloat16/float16/float64, got {q.dtype}")
    if not 0 <= row_offset <= k.shape[0] - q.shape[0]:
        raise ValueError(f"row_offset {row_offset} puts the positives of {q.shape[0]} rows "
                         f"outside {k.shape[0]} columns")
    if q.device.type == "cpu" and not _interpreting():
        raise RuntimeError("triton kernels on CPU tensors run only in Triton's interpreter: set TRITON_INTERPRET=1")
    if q.device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"triton contrastive kernels run on CUDA (or CPU under the interpreter), not {q.device}")
    tiles = tiles or _default_tiles(q, kernel)
    for size in (tiles.block_m, tiles.block_n, tiles.block_k):
        if size < 16 or size & (size - 1):
            raise ValueError(f"tile sizes must be powers of two >= 16, got {tiles}")
    import triton.language as tl

    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    consts = dict(BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k,
                  EVEN_K=q.shape[1] % tiles.block_k == 0,
                  UPCAST=not q.is_cuda and q.dtype in (torch.bfloat16, torch.float16),
                  ACC=tl.float64 if cdt == torch.float64 else tl.float32,
                  PRECISION=FP32_DOT_PRECISION if q.dtype == torch.float32 else "ieee",
                  WIDE=max(q.numel(), k.numel()) >= _INT32_LIMIT,
                  num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    return _Setup(cdt, tiles, consts)


def _scalar(value: torch.Tensor, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A 0-dim/[1] tensor as a [1] device tensor the kernels load (no host sync)."""
    if value.numel() != 1:
        raise ValueError(f"scale/bias must be 0-dim or [1], got shape {tuple(value.shape)}")
    return value.detach().reshape(1).to(device=like.device, dtype=dtype)


def _scales(scale: torch.Tensor, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[s, s·log2(e)]: the kernels work in log2 units, with the constant applied in `dtype`."""
    s = _scalar(scale, like, dtype)
    return torch.cat([s, s * LOG2E])


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _stats_grid(b: int, big_b: int, tiles: TileConfig, q: torch.Tensor, itemsize: int) -> tuple[int, int, int]:
    """(P row groups, S column splits, column tiles per split); every split is non-empty."""
    n_row_tiles = -(-b // tiles.block_m)
    n_col_tiles = -(-big_b // tiles.block_n)
    programs = 2 * _num_sms(q.device.index if q.device.index is not None else torch.cuda.current_device()) \
        if q.is_cuda else 2
    groups = tiles.row_groups or min(programs, max(1, PARTIAL_BYTES // (2 * itemsize * big_b)))
    groups = max(1, min(groups, n_row_tiles))
    splits = tiles.col_splits or -(-programs // groups)
    splits = max(1, min(splits, n_col_tiles))
    per_split = -(-n_col_tiles // splits)
    return groups, -(-n_col_tiles // per_split), per_split


@_plain
def infonce_block_stats(q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, row_offset: int, chunk: int | None,
                        *, tiles: TileConfig | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row log-sum-exp and column max/sum-exp of l = s·q·kᵀ in one product per logit.

    Args:
        q: [b, D] this block's rows; k: [B, D] all columns (same dtype and device).
        scale: 0-dim or [1], s (already exponentiated).
        row_offset: row i's positive is column i + row_offset.
        chunk: unused here (the gradient passes' block width); kept for the shared contract.
        tiles: optional tile/grid override (tests, tuning).
    Returns (float32; float64 for float64 inputs):
        row_lse [b] = logsumexp_j l_ij; col_max [B] = max_i l_ij;
        col_sumexp [B] = Σ_i exp(l_ij − col_max_j); positive_sum 0-dim = Σ_i l_{i, i+row_offset}.
    """
    del chunk
    st = _setup(q, k, row_offset, tiles, "stats")
    b, big_b = q.shape[0], k.shape[0]
    dev, cdt = q.device, st.cdt
    if b == 0:
        return (torch.empty(0, dtype=cdt, device=dev), torch.full((big_b,), -math.inf, dtype=cdt, device=dev),
                torch.zeros(big_b, dtype=cdt, device=dev), torch.zeros((), dtype=cdt, device=dev))
    q, k = q.contiguous(), k.contiguous()
    itemsize = torch.empty((), dtype=cdt).element_size()
    groups, splits, per_split = _stats_grid(b, big_b, st.tiles, q, itemsize)
    col_m = torch.empty(groups, big_b, dtype=cdt, device=dev)
    col_s = torch.empty(groups, big_b, dtype=cdt, device=dev)
    row_m = torch.empty(splits, b, dtype=cdt, device=dev)
    row_s = torch.empty(splits, b, dtype=cdt, device=dev)
    pos = torch.empty(groups * splits, dtype=cdt, device=dev)
    kern = _kernels()
    kern.infonce_stats_kernel[(groups, splits)](
        q, k, _scales(scale, q, cdt), row_m, row_s, col_m, col_s, pos,
        b, big_b, q.shape[1], row_offset, q.stride(0), k.stride(0), -(-b // st.tiles.block_m), per_split,
        **st.consts)
    row_max, row_sum = _merge(kern, row_m, row_s, st.consts["ACC"])
    col_max, col_sumexp = _merge(kern, col_m, col_s, st.consts["ACC"])
    # log2-unit maxima back to natural units: lse = max·ln2 + ln(Σ exp2(x − max)).
    return row_max * math.log(2) + row_sum.log(), col_max * math.log(2), col_sumexp, pos.sum()


def _merge(kern, m: torch.Tensor, s: torch.Tensor, acc) -> tuple[torch.Tensor, torch.Tensor]:
    parts, n = m.shape
    out_m, out_s = torch.empty(n, dtype=m.dtype, device=m.device), torch.empty(n, dtype=m.dtype, device=m.device)
    block = 1024
    kern.merge_max_sum_kernel[(-(-n // block),)](m, s, out_m, out_s, n, parts, BLOCK=block, ACC=acc, num_warps=4)
    return out_m, out_s


def _grad_layout(q: torch.Tensor, cdt: torch.dtype):
    """dtype of the gradient block G and of the cuBLAS operands multiplied with it."""
    if q.dtype in (torch.bfloat16, torch.float16):
        return torch.bfloat16
    return cdt


def _block_width(b: int, big_b: int, chunk: int | None, itemsize: int, block_n: int) -> int:
    chunk = DEFAULT_GRAD_WIDTH if chunk is None else chunk
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    width = min(chunk, GRAD_BLOCK_BYTES // max(1, b * itemsize))
    width = max(block_n, width // block_n * block_n)
    return min(width, big_b)


_ADDMM_OUT_DTYPE = True


def _gemm(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, accumulate: bool) -> None:
    """out (+)= a @ b, accumulated in out's dtype (float32 output from bf16 operands on CUDA)."""
    global _ADDMM_OUT_DTYPE
    if a.dtype == out.dtype:
        if accumulate:
            out.addmm_(a, b)
        else:
            torch.mm(a, b, out=out)
    elif not a.is_cuda:  # interpreter runs: CPU torch has no bf16 x bf16 -> fp32 GEMM
        prod = torch.mm(a.to(out.dtype), b.to(out.dtype))
        if accumulate:
            out.add_(prod)
        else:
            out.copy_(prod)
    elif not accumulate:
        torch.mm(a, b, out_dtype=out.dtype, out=out)
    else:
        if _ADDMM_OUT_DTYPE:
            try:
                torch.addmm(out, a, b, out_dtype=out.dtype, out=out)
                return
            except RuntimeError as err:  # older torch: addmm's out_dtype wants self in the operands' dtype
                if "dtype" not in str(err):
                    raise
                _ADDMM_OUT_DTYPE = False
        out.add_(torch.mm(a, b, out_dtype=out.dtype))


def _pairwise_grads(launch, q: torch.Tensor, k: torch.Tensor, st: _Setup, chunk: int | None,
                    need_q: bool, need_k: bool, write_g: bool):
    """Runs `launch(g_block, c0, c1, consts)` on each column block and multiplies G into dq/dk."""
    b, big_b, dim = q.shape[0], k.shape[0], q.shape[1]
    gdt = _grad_layout(q, st.cdt)
    itemsize = torch.empty((), dtype=gdt).element_size()
    width = _block_width(b, big_b, chunk, itemsize, st.tiles.block_n)
    g_block = torch.empty(b, width, dtype=gdt, device=q.device) if write_g else None
    consts = {**st.consts, "WIDE": st.consts["WIDE"] or b * width >= _INT32_LIMIT}
    q_op = q if q.dtype == gdt or not need_k else q.to(gdt)
    k_op = k if k.dtype == gdt or not need_q else k.to(gdt)
    dq = torch.empty(b, dim, dtype=st.cdt, device=q.device) if need_q else None
    dk = torch.empty(big_b, dim, dtype=st.cdt, device=q.device) if need_k else None
    for c0 in range(0, big_b, width):
        c1 = min(big_b, c0 + width)
        g = g_block[:, :c1 - c0] if write_g else None
        launch(g_block, c0, c1, consts)
        if dq is not None:
            _gemm(dq, g, k_op[c0:c1], accumulate=c0 > 0)
        if dk is not None:
            _gemm(dk[c0:c1], g.T, q_op, accumulate=False)
    return dq, dk


@_plain
def infonce_block_grads(q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, row_offset: int,
                        row_lse: torch.Tensor, col_lse: torch.Tensor, chunk: int | None, need_q: bool, need_k: bool,
                        *, tiles: TileConfig | None = None
                        ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """dq = G·k and dk = Gᵀ·q for G = exp(l − row_lse) + exp(l − col_lse) − 2·[j = i + row_offset].

    Args: q [b, D], k [B, D], scale and row_offset as in `infonce_block_stats`;
        row_lse [b], col_lse [B] (col_lse = col_max + log col_sumexp, globally reduced);
        chunk: columns per gradient block (memory b × chunk × 2 bytes for 16-bit inputs,
        4 for float32; capped at GRAD_BLOCK_BYTES; None: DEFAULT_GRAD_WIDTH); need_q/need_k:
        which outputs to form.
    Returns: dq [b, D] or None, dk [B, D] or None, float32 (float64 for float64 inputs),
        not multiplied by s.
    """
    st = _setup(q, k, row_offset, tiles, "grad")
    if not (need_q or need_k):
        return None, None
    b, big_b = q.shape[0], k.shape[0]
    if b == 0:
        return (torch.zeros(0, q.shape[1], dtype=st.cdt, device=q.device) if need_q else None,
                torch.zeros(big_b, q.shape[1], dtype=st.cdt, device=q.device) if need_k else None)
    q, k = q.contiguous(), k.contiguous()
    s = _scales(scale, q, st.cdt)
    row_lse2 = (row_lse.detach().to(device=q.device, dtype=st.cdt) * LOG2E).contiguous()
    col_lse2 = (col_lse.detach().to(device=q.device, dtype=st.cdt) * LOG2E).contiguous()
    kern = _kernels()
    tm, tn = st.tiles.block_m, st.tiles.block_n

    def launch(g_block, c0, c1, consts):
        grid = (-(-b // tm) * -(-(c1 - c0) // tn),)
        kern.infonce_grad_kernel[grid](
            q, k[c0:c1], s, row_lse2, col_lse2[c0:c1], g_block,
            b, c1 - c0, q.shape[1], row_offset - c0, q.stride(0), k.stride(0), g_block.stride(0), **consts)

    return _pairwise_grads(launch, q, k, st, chunk, need_q, need_k, write_g=True)


@_plain
def sigmoid_block(q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                  row_offset: int | None, chunk: int | None, need_grads: bool, *, tiles: TileConfig | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """SigLIP's pairwise loss on a row block, and its gradients in the same pass.

    Args: q [b, D], k [B, D]; scale, bias 0-dim or [1] (s already exponentiated, β);
        row_offset: y_ij = +1 at j = i + row_offset, −1 elsewhere (None: −1 everywhere, a
            block of another rank's texts in SigLIP's ring); chunk: columns per
        gradient block (as in `infonce_block_grads`); need_grads: form dq, dk and Σ G.
    Returns (float32; float64 for float64 inputs): loss_sum 0-dim = Σ_ij softplus(−y_ij·l_ij)
        with l = s·q·kᵀ + β; dq [b, D] = G·k, dk [B, D] = Gᵀ·q (not multiplied by s) and
        grad_sum 0-dim = Σ_ij G_ij for G = σ(l) − [y = +1], or None without need_grads.
    """
    st = _setup(q, k, 0 if row_offset is None else row_offset, tiles, "sigmoid")
    if row_offset is None:  # a positive column past the last one: no (row, column) pair matches
        row_offset = k.shape[0]
    b, big_b, dev = q.shape[0], k.shape[0], q.device
    zero = torch.zeros((), dtype=st.cdt, device=dev)
    if b == 0:
        if not need_grads:
            return zero, None, None, None
        return (zero, torch.zeros(0, q.shape[1], dtype=st.cdt, device=dev),
                torch.zeros(big_b, q.shape[1], dtype=st.cdt, device=dev), zero.clone())
    q, k = q.contiguous(), k.contiguous()
    s, beta = _scalar(scale, q, st.cdt), _scalar(bias, q, st.cdt)
    kern = _kernels()
    tm, tn = st.tiles.block_m, st.tiles.block_n
    loss_parts, grad_parts = [], []

    def launch(g_block, c0, c1, consts):
        grid = (-(-b // tm) * -(-(c1 - c0) // tn),)
        loss = torch.empty(grid[0], dtype=st.cdt, device=dev)
        gsum = torch.empty(grid[0], dtype=st.cdt, device=dev)
        kern.sigmoid_kernel[grid](
            q, k[c0:c1], s, beta, g_block if g_block is not None else loss, loss, gsum,
            b, c1 - c0, q.shape[1], row_offset - c0, q.stride(0), k.stride(0),
            g_block.stride(0) if g_block is not None else 0, WRITE_G=g_block is not None, **consts)
        loss_parts.append(loss.sum())
        grad_parts.append(gsum.sum())

    dq, dk = _pairwise_grads(launch, q, k, st, chunk, need_grads, need_grads, write_g=need_grads)
    loss_sum = torch.stack(loss_parts).sum()
    if not need_grads:
        return loss_sum, None, None, None
    return loss_sum, dq, dk, torch.stack(grad_parts).sum()
