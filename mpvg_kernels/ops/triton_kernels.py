"""Triton kernels of the fused LayerNorm op family (``layer_norm.py``): LayerNorm (+ position embedding) (+ mean
pooling), and their two launchers.

One launcher per direction, :func:`forward` and :func:`backward`, serves every route (the eager fast path, the
``mpvg::`` ops on CUDA and under the interpreter, the ``mpvg_triton::`` ops under ``torch.compile``); they follow the
kernel contract of ``layer_norm.reference_forward`` / ``reference_backward``: ``x3`` is ``[B, N, D]`` with stride 1
in the last dim and any strides in the first two, ``pe`` an ``[N, D]`` tensor indexed by token (never expanded over
the batch), the statistics one ``[2 * B * N]`` buffer (mean, then rstd).

Kernels (each variant is selected by constexpr flags):

- ``_ln_fwd_kernel``: ``HAS_PE`` adds ``pe[n]``; ``POOL`` averages over tokens instead of writing per-token
  output. Per-token mode: each program normalises ``ROWS`` consecutive rows (a ``[ROWS, BLOCK_D]`` tile),
  reading x once and writing y once. Pool mode: program ``(b, s)`` walks split ``s`` of batch element ``b``'s
  tokens in tiles and writes one fp32 partial ``[D]`` (or, with a single split, the output row itself).
- ``_ln_bwd_kernel``: program ``(t, s)`` owns ``ROWS`` tokens and loops over batch chunk ``s``; it writes dx
  and fixed-layout partial sums of dweight, dbias (``[programs, D]``) and dpe (``[splits, N, D]``).
- ``_sum_partials_kernel``: one small launch that sums up to three partial buffers over their leading dim in
  a fixed order (row 0, 1, 2, ...) and casts to the output dtype: the backward's dweight, dbias and dpe, or
  the pooled forward's token splits. No atomics anywhere: results are bitwise reproducible.

**Compile-time D.** The feature dim ``D`` is a constexpr, so each D compiles its own kernels (ViT widths are
few; the compile is cached per D, dtype and flags). With D known, the column mask and the row offsets of the
contiguous buffers (y, dx, pe, partials) have a provable alignment for any D that is a multiple of the vector
width (D = 200 or 1000, not only multiples of 16), and the compiler emits 16-byte accesses. The row strides of
x and of the upstream gradient are passed in units of ``VEC`` elements and multiplied back by the constexpr
``VEC`` inside the kernel, so the compiler knows every row start is a multiple of ``VEC`` elements. The host
chooses ``VEC`` (:func:`vector_width`) as the widest power of two, up to 16 bytes, that divides those strides
and the tensors' start addresses; a misaligned view (one element in) gets ``VEC = 1`` and scalar accesses,
never a misaligned vector access. (Triton itself also checks every pointer argument's 16-byte alignment when
it specialises a launch.)

**Float arguments.** On a GPU, Python floats reach a kernel as fp32. So ``1 / N`` is computed inside the
kernel from the integer N in the accumulation dtype, and ``eps`` is passed as an fp32 pair ``eps_hi + eps_lo``
that the kernel adds in the accumulation dtype: float64 x gets eps to ~1e-15 relative, not fp32's 6e-8.

**Work splits.** Statistics and accumulation are float32 (float64 when x is float64). Tile sizes and warp
counts are pure functions of D and dtype (:func:`forward_config`, :func:`backward_config`); split counts of
the shape only, aiming at ``_TARGET_PROGRAMS`` programs (two waves of the 132 SMs of an H100/H200; a constant
so that the summation order never depends on the GPU), with the backward's split count also capped so that
its partial sums cost at most a fixed share of its minimal memory traffic. No autotuning, which keeps the
launches CUDA-graph friendly. Planning is cached per shape, strides, dtype and alignment (a call is one dict lookup,
the allocations and the launches). Importing this module needs no GPU.
"""

from __future__ import annotations

import contextlib
import functools
import struct
from collections.abc import Callable
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import is_fake


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The kernels' accumulation dtype: float64 for float64 inputs, else float32 (the op contract's rule)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


__all__ = [
    "MAX_D",
    "BackwardPlan",
    "ForwardPlan",
    "KernelConfig",
    "Launch",
    "acc_dtype",
    "backward",
    "backward_config",
    "forward",
    "forward_config",
    "partial_traffic_ratio",
    "run_kernel",
    "vector_width",
]

#: Largest feature dim the single-tile-per-row kernels accept.
MAX_D = 65536

# Elements of one [ROWS, BLOCK_D] tile (halved for float64), and tile elements per thread. Eight elements
# per thread is one 16-byte load of bf16/fp16 or two of fp32, and keeps both kernels far from spilling
# (the backward holds x, dy and two accumulator tiles); checked by tests/ops/test_triton_compile.py. The
# backward uses smaller tiles: more token tiles give it enough programs with fewer batch splits, hence
# smaller dpe partials.
_TILE_FWD = 2048
_TILE_BWD = 1024
_ELEMS_PER_THREAD = 8
_MAX_ROWS = 64
_MAX_WARPS = 32
# Programs a launch aims for when it splits work for parallelism (pool forward, backward batch splits): two
# waves of a 132-SM GPU (H100/H200; 2.4 of an A100's 108). A constant, not the SM count of the device at
# hand: split counts (hence summation order) must depend on the shape alone.
_TARGET_PROGRAMS = 264
# The backward's dpe partials (written once, read once) may cost at most 1/_PARTIAL_SHARE of the bytes the
# backward must move anyway (x and dy read, dx written); this caps its batch splits for small batches.
_PARTIAL_SHARE = 8
# Columns per program of the partial-sum finish.
_SUM_BLOCK = 1024
# Partial buffers' rows start at multiples of this many elements (16-byte aligned for any dtype).
_PITCH = 16


class KernelConfig(NamedTuple):
    """Launch parameters of one kernel: padded feature width, rows per tile, warps per program."""

    block_d: int
    rows: int
    num_warps: int


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


@functools.lru_cache(maxsize=256)
def _config(D: int, dtype: torch.dtype, tile: int) -> KernelConfig:
    if D > MAX_D:
        raise ValueError(f"the Triton kernels support D <= {MAX_D}, got D = {D}")
    tile = tile // 2 if dtype == torch.float64 else tile
    block_d = _next_pow2(max(int(D), 1))
    rows = max(1, min(_MAX_ROWS, tile // block_d))
    num_warps = max(1, min(_MAX_WARPS, rows * block_d // (32 * _ELEMS_PER_THREAD)))
    return KernelConfig(block_d, rows, num_warps)


def forward_config(D: int, dtype: torch.dtype) -> KernelConfig:
    """Tile and warp heuristic of the forward kernel (per-token and pooled) for feature dim D and x dtype."""
    return _config(D, dtype, _TILE_FWD)


def backward_config(D: int, dtype: torch.dtype) -> KernelConfig:
    """Tile and warp heuristic of the backward kernel for feature dim D and x dtype."""
    return _config(D, dtype, _TILE_BWD)


def _split(units: int, others: int) -> tuple[int, int]:
    """Cut ``units`` work items into chunks so that ``others * chunks`` approaches the target program count.

    Returns (items per chunk, number of chunks); a pure function of its arguments.
    """
    want = max(1, min(units, _cdiv(_TARGET_PROGRAMS, max(others, 1))))
    per = _cdiv(units, want)
    return per, _cdiv(units, per)


def _bwd_split(B: int, n_tok: int, elem_size: int, acc_size: int) -> tuple[int, int]:
    """Batch split of the backward: (batch elements per program, splits); a pure function of its arguments.

    Aims at ``_TARGET_PROGRAMS`` programs, but never so many splits that the dpe partials (``splits * N * D``
    accumulators, written and read once) exceed 1/_PARTIAL_SHARE of the x, dy and dx traffic
    (``3 * B * N * D`` elements of x's dtype).
    """
    want = _cdiv(_TARGET_PROGRAMS, max(n_tok, 1))
    cap = max(1, (3 * B * elem_size) // (2 * acc_size * _PARTIAL_SHARE))
    want = max(1, min(B, want, cap))
    per = _cdiv(B, want)
    return per, _cdiv(B, per)


def _tl_acc(dtype: torch.dtype) -> tl.dtype:
    return tl.float64 if dtype == torch.float64 else tl.float32


@functools.lru_cache(maxsize=64)
def _eps_pair(eps: float) -> tuple[float, float]:
    """eps as two fp32-representable floats whose sum (in fp64) is eps to ~2^-48 relative."""
    hi = struct.unpack("f", struct.pack("f", eps))[0]
    lo = struct.unpack("f", struct.pack("f", eps - hi))[0]
    return hi, lo


def _addr_mod(t: torch.Tensor) -> int:
    """Start address of t modulo 16 bytes. Meta tensors plan as aligned; fake tensors (tracing) by their storage
    offset, as Inductor assumes their storage 16-byte aligned (it copies an input that is not at run time)."""
    if is_fake(t):
        return int(t.storage_offset()) * t.element_size() % 16
    return t.data_ptr() % 16  # 0 for meta tensors


def vector_width(elem_size: int, strides: tuple[int, ...], addr_mods: tuple[int, ...]) -> int:
    """Widest power-of-two element count (at most 16 bytes) dividing every row stride and start address.

    The kernels multiply row indices by strides given in units of this width, so the compiler may assume
    every row starts at a multiple of it: only what the host has checked here.
    """
    v = max(1, 16 // elem_size)
    while v > 1 and (any(s % v for s in strides) or any(a % (v * elem_size) for a in addr_mods)):
        v //= 2
    return v


_NO_GUARD = contextlib.nullcontext()


def _device_guard(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Make t's GPU the current one for the launches (a no-op on CPU, while tracing (fake tensors: the compiled
    program launches) and when it already is)."""
    if t.device.type != "cuda" or type(t) not in _PLAIN or t.device.index == torch.cuda.current_device():
        return _NO_GUARD
    return torch.cuda.device(t.device)


# ----------------------------------------------------------------------------------------------- kernels


@triton.jit
def _rstd(var_eps, ACC_DTYPE: tl.constexpr):
    """1 / sqrt(var + eps): the hardware rsqrt in fp32 (~1e-7 relative), correctly rounded sqrt and divide in fp64."""
    if ACC_DTYPE == tl.float64:
        r = 1.0 / tl.sqrt(var_eps)
    else:
        r = tl.math.rsqrt(var_eps)
    return r


@triton.jit
def _ln_fwd_kernel(
    X,  # [B, N, D] input, row address (b * sxb + n * sxn) * VEC
    PE,  # [N, D] contiguous (read only when HAS_PE)
    W,  # [D]
    Bias,  # [D]
    Y,  # per-token: [B*N, D] contiguous; pool: [splits, B, D] at s * stride_ys + b * D
    Mean,  # [B*N] at Mean (written only when STATS)
    Rstd,  # [B*N] at Rstd + rstd_off (written only when STATS)
    rstd_off,
    N,
    n_rows,  # B * N
    sxb,  # x's batch stride / VEC
    sxn,  # x's token stride / VEC
    stride_ys,
    tiles_per_prog,  # pool: token tiles handled by one program
    eps_hi,
    eps_lo,
    D: tl.constexpr,
    VEC: tl.constexpr,
    HAS_PE: tl.constexpr,
    POOL: tl.constexpr,
    STATS: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    eps = tl.cast(eps_hi, ACC_DTYPE) + tl.cast(eps_lo, ACC_DTYPE)
    cols = tl.arange(0, BLOCK_D)
    col_mask = cols < D
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(ACC_DTYPE)
    bias = tl.load(Bias + cols, mask=col_mask, other=0.0).to(ACC_DTYPE)
    if POOL:
        b = tl.program_id(0).to(tl.int64)
        n0 = tl.program_id(1).to(tl.int64) * tiles_per_prog * ROWS
        acc = tl.zeros([ROWS, BLOCK_D], dtype=ACC_DTYPE)
        t = 0
        while t < tiles_per_prog:  # a while loop: see _ln_bwd_kernel
            n = n0 + t * ROWS + tl.arange(0, ROWS).to(tl.int64)
            row_mask = n < N
            mask = row_mask[:, None] & col_mask[None, :]
            x_ptrs = X + ((b * sxb + n * sxn) * VEC)[:, None] + cols[None, :]
            x = tl.load(x_ptrs, mask=mask, other=0.0).to(ACC_DTYPE)
            mean = tl.sum(x, axis=1) / D
            xc = tl.where(mask, x - mean[:, None], 0.0)
            rstd = _rstd(tl.sum(xc * xc, axis=1) / D + eps, ACC_DTYPE)
            if STATS:
                rows = b * N + n
                tl.store(Mean + rows, mean.to(Mean.dtype.element_ty), mask=row_mask)
                tl.store(Rstd + rstd_off + rows, rstd.to(Rstd.dtype.element_ty), mask=row_mask)
            y = xc * rstd[:, None] * w[None, :] + bias[None, :]
            if HAS_PE:
                pe = tl.load(PE + n[:, None] * D + cols[None, :], mask=mask, other=0.0)
                y += pe.to(ACC_DTYPE)
            acc += tl.where(mask, y, 0.0)
            t += 1
        out = tl.sum(acc, axis=0) / tl.cast(N, ACC_DTYPE)
        y_ptrs = Y + tl.program_id(1).to(tl.int64) * stride_ys + b * D + cols
        tl.store(y_ptrs, out.to(Y.dtype.element_ty), mask=col_mask)
    else:
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)
        row_mask = rows < n_rows
        b = rows // N
        n = rows - b * N
        mask = row_mask[:, None] & col_mask[None, :]
        x_ptrs = X + ((b * sxb + n * sxn) * VEC)[:, None] + cols[None, :]
        x = tl.load(x_ptrs, mask=mask, other=0.0).to(ACC_DTYPE)
        mean = tl.sum(x, axis=1) / D
        xc = tl.where(mask, x - mean[:, None], 0.0)
        rstd = _rstd(tl.sum(xc * xc, axis=1) / D + eps, ACC_DTYPE)
        if STATS:
            tl.store(Mean + rows, mean.to(Mean.dtype.element_ty), mask=row_mask)
            tl.store(Rstd + rstd_off + rows, rstd.to(Rstd.dtype.element_ty), mask=row_mask)
        y = xc * rstd[:, None] * w[None, :] + bias[None, :]
        if HAS_PE:
            pe = tl.load(PE + n[:, None] * D + cols[None, :], mask=mask, other=0.0)
            y += pe.to(ACC_DTYPE)
        tl.store(Y + rows[:, None] * D + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _ln_bwd_kernel(
    X,  # [B, N, D] input, row address (b * sxb + n * sxn) * VEC
    G,  # per-token: [B, N, D] upstream gradient, row address (b * sgb + n * sgn) * VEC; pool: [B, D]
    W,  # [D]
    Mean,  # [B*N]
    Rstd,  # [B*N] at Rstd + rstd_off
    DX,  # [B*N, D] contiguous
    Part,  # partial sums at Part: dweight [programs, pitch_w], then dbias, then dpe [splits, pitch_pe] (HAS_PE)
    rstd_off,
    db_off,  # element offsets of the dbias and dpe partials in Part (multiples of 16)
    dpe_off,
    B,
    N,
    sxb,
    sxn,
    sgb,
    sgn,
    b_per_prog,  # batch elements handled by one program
    pitch_w,
    pitch_pe,
    D: tl.constexpr,
    VEC: tl.constexpr,
    HAS_PE: tl.constexpr,
    POOL: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_s = tl.program_id(1)
    n = pid_t.to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)
    n_ok = n < N
    cols = tl.arange(0, BLOCK_D)
    col_mask = cols < D
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(ACC_DTYPE)
    acc_dw = tl.zeros([ROWS, BLOCK_D], dtype=ACC_DTYPE)
    if POOL:
        # Every token of batch element b receives the same dy = grad[b] / N: accumulate it once per column.
        inv_n = 1.0 / tl.cast(N, ACC_DTYPE)
        acc_g = tl.zeros([BLOCK_D], dtype=ACC_DTYPE)
    else:
        acc_db = tl.zeros([ROWS, BLOCK_D], dtype=ACC_DTYPE)
    b_start = pid_s.to(tl.int64) * b_per_prog
    # Loops with run-time bounds are while loops over a plain count (the last chunk masked): the interpreter
    # of Triton 3.6 cannot run `for ... in range(bound)` with a kernel argument as bound.
    i = 0
    while i < b_per_prog:
        b = b_start + i
        b_ok = b < B
        row_mask = n < tl.where(b_ok, N, 0)
        mask = row_mask[:, None] & col_mask[None, :]
        rows = b * N + n
        mean = tl.load(Mean + rows, mask=row_mask, other=0.0).to(ACC_DTYPE)
        rstd = tl.load(Rstd + rstd_off + rows, mask=row_mask, other=0.0).to(ACC_DTYPE)
        x_ptrs = X + ((b * sxb + n * sxn) * VEC)[:, None] + cols[None, :]
        x = tl.load(x_ptrs, mask=mask, other=0.0).to(ACC_DTYPE)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        if POOL:
            g = tl.load(G + tl.minimum(b, B - 1) * sgb * VEC + cols, mask=col_mask, other=0.0)
            g = tl.where(b_ok, g.to(ACC_DTYPE) * inv_n, 0.0)
            wg = w * g
            c1 = tl.sum(xhat * wg[None, :], axis=1) / D
            c2 = tl.sum(wg, axis=0) / D
            dx = (wg[None, :] - (xhat * c1[:, None] + c2)) * rstd[:, None]
            acc_dw += g[None, :] * xhat  # xhat is 0 on padding rows and columns
            acc_g += g
        else:
            g_ptrs = G + ((b * sgb + n * sgn) * VEC)[:, None] + cols[None, :]
            dy = tl.load(g_ptrs, mask=mask, other=0.0).to(ACC_DTYPE)
            wdy = dy * w[None, :]
            c1 = tl.sum(xhat * wdy, axis=1) / D
            c2 = tl.sum(wdy, axis=1) / D
            dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
            acc_dw += dy * xhat
            acc_db += dy
        tl.store(DX + rows[:, None] * D + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        i += 1
    prog = pid_s.to(tl.int64) * tl.num_programs(0) + pid_t
    tl.store(Part + prog * pitch_w + cols, tl.sum(acc_dw, axis=0), mask=col_mask)
    tile_mask = n_ok[:, None] & col_mask[None, :]
    if POOL:
        n_valid = tl.minimum(N - pid_t * ROWS, ROWS)
        tl.store(Part + db_off + prog * pitch_w + cols, acc_g * n_valid, mask=col_mask)
        dpe_tile = tl.where(tile_mask, acc_g[None, :], 0.0)
    else:
        tl.store(Part + db_off + prog * pitch_w + cols, tl.sum(acc_db, axis=0), mask=col_mask)
        dpe_tile = acc_db
    if HAS_PE:
        dpe_ptrs = Part + dpe_off + pid_s.to(tl.int64) * pitch_pe + n[:, None] * D + cols[None, :]
        tl.store(dpe_ptrs, dpe_tile, mask=tile_mask)


@triton.jit
def _sum_rows(P, O, n_parts, pitch, width, blk, BLOCK: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """O[c] = sum over r = 0, 1, ..., n_parts - 1 (in that order) of P[r * pitch + c], for one column block
    (P already offset to the first partial row).

    The loads run over the padded row (``pitch``, a multiple of 16 elements, so they can be 16 bytes wide);
    only the ``width`` real columns are stored.
    """
    cols = blk.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    load_mask = cols < pitch
    acc = tl.zeros([BLOCK], dtype=ACC_DTYPE)
    ptrs = P + cols
    r = 0
    while r < n_parts:  # a while loop: see _ln_bwd_kernel
        acc += tl.load(ptrs, mask=load_mask, other=0.0).to(ACC_DTYPE)
        ptrs += pitch
        r += 1
    tl.store(O + cols, acc.to(O.dtype.element_ty), mask=cols < width)


@triton.jit
def _sum_partials_kernel(
    P, off0, off1, off2,
    O0, parts0, pitch0, width0, blocks0,
    O1, parts1, pitch1, width1, blocks1,
    O2, parts2, pitch2, width2,
    BLOCK: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):  # fmt: skip
    """Up to three fixed-order reductions of one partial buffer ``P`` in one launch: programs [0, blocks0)
    reduce the rows at ``P + off0`` into O0, the next blocks1 programs those at ``P + off1`` into O1, the rest
    those at ``P + off2`` into O2 (offsets in elements, multiples of 16)."""
    pid = tl.program_id(0)
    if pid < blocks0:
        _sum_rows(P + off0, O0, parts0, pitch0, width0, pid, BLOCK, ACC_DTYPE)
    elif pid < blocks0 + blocks1:
        _sum_rows(P + off1, O1, parts1, pitch1, width1, pid - blocks0, BLOCK, ACC_DTYPE)
    else:
        _sum_rows(P + off2, O2, parts2, pitch2, width2, pid - blocks0 - blocks1, BLOCK, ACC_DTYPE)


# ----------------------------------------------------------------------------------------------- launchers


class Launch(NamedTuple):
    """One kernel launch as the launchers make it: ``kernel[grid](*args, **meta)``; ``meta`` holds constexprs and
    num_warps. The ahead-of-time compile test records these (``launch=`` of :func:`forward` / :func:`backward`) to
    compile exactly the specialisation the JIT sees."""

    kernel: triton.JITFunction
    grid: tuple[int, ...]
    args: tuple
    meta: dict


def run_kernel(kernel: triton.JITFunction, grid: tuple[int, ...], args: tuple, meta: dict) -> None:
    """Launch ``kernel[grid](*args, **meta)``: the launchers' default ``launch`` (a single point to stub for
    measuring host overhead)."""
    kernel[grid](*args, **meta)


class _FinishStatic(NamedTuple):
    grid: tuple[int]
    offsets: tuple[int, int, int]  # element offsets of the segments in the partial buffer
    scalars: tuple[tuple, ...]  # per segment: (parts, pitch, width[, blocks])
    meta: dict


@functools.lru_cache(maxsize=1024)
def _finish_static(segments: tuple[tuple[int, int, int, int], ...], acc: torch.dtype) -> _FinishStatic:
    """Grid and scalar arguments of one ``_sum_partials_kernel`` launch for up to three (offset, parts, pitch,
    width) segments of one partial buffer; absent segments get zero programs."""
    segs = list(segments) + [(0, 0, 0, 0)] * (3 - len(segments))
    blocks = [_cdiv(w, _SUM_BLOCK) for *_, w in segs]
    scalars = tuple((*seg[1:], blocks[i]) if i < 2 else seg[1:] for i, seg in enumerate(segs))
    offsets = tuple(seg[0] for seg in segs)
    meta = dict(BLOCK=_SUM_BLOCK, ACC_DTYPE=_tl_acc(acc), num_warps=4)
    return _FinishStatic((max(1, sum(blocks)),), offsets, scalars, meta)  # type: ignore[arg-type]


def _finish_args(st: _FinishStatic, partial: torch.Tensor, outs: tuple[torch.Tensor, ...]) -> tuple:
    """The arguments of :func:`_finish_static`'s launch summing ``partial`` into ``outs`` (absent ones repeat the
    first)."""
    o = outs + (outs[0],) * (3 - len(outs))
    sc = st.scalars
    return (partial, *st.offsets, o[0], *sc[0], o[1], *sc[1], o[2], *sc[2])


def _row_vector_width(dtype: torch.dtype, sizes: tuple[int, ...], stride_sets: tuple[tuple[int, ...], ...],
                      addr_mods: tuple[int, ...]) -> int:
    """:func:`vector_width` for row strides of tensors of ``sizes`` (strides of size-1 dims never move)."""
    es = dtype.itemsize
    strides = tuple(s for ss in stride_sets for s, size in zip(ss, sizes, strict=True) if size > 1)
    return vector_width(es, strides, addr_mods)


def _in_units(strides: tuple[int, ...], sizes: tuple[int, ...], vec: int) -> tuple[int, ...]:
    """Row strides in units of ``vec`` elements (0 for size-1 dims), as the kernels take them."""
    return tuple(s // vec if size > 1 else 0 for s, size in zip(strides, sizes, strict=True))


def _kernel_meta(cfg: KernelConfig, D: int, vec: int, dtype: torch.dtype, has_pe: bool, pool: bool) -> dict:
    """The compile-time arguments of the forward and backward kernels."""
    return dict(D=D, VEC=vec, HAS_PE=has_pe, POOL=pool, ROWS=cfg.rows, BLOCK_D=cfg.block_d,
                ACC_DTYPE=_tl_acc(dtype), num_warps=cfg.num_warps)


def _contig(*size: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(size, contiguous strides): the arguments of ``torch.empty_strided``, the cheapest allocation call."""
    strides, acc = [], 1
    for n in reversed(size):
        strides.append(acc)
        acc *= max(n, 1)
    return tuple(size), tuple(reversed(strides))


_PLAIN = frozenset((torch.Tensor, torch.nn.Parameter))


def _start_mod(t: torch.Tensor) -> int:
    """Start address of t modulo 16 bytes (tensor subclasses, fake ones included, by :func:`_addr_mod`'s rule)."""
    return t.data_ptr() % 16 if type(t) in _PLAIN else _addr_mod(t)


# The launchers' plans, keyed by (shape, strides, dtype, start addresses mod 16, flags): one dict lookup per call.
# Bounded by the shapes a process runs (a model has a handful); cleared when it passes _PLANS_MAX.
_FWD_PLANS: dict[tuple, ForwardPlan] = {}
_BWD_PLANS: dict[tuple, BackwardPlan] = {}
_PLANS_MAX = 4096
_empty = torch.empty_strided


class ForwardPlan(NamedTuple):
    """Everything of a forward call that depends on shape, strides, dtype, alignment and flags (B * N > 0)."""

    grid: tuple[int, ...]
    meta: dict
    acc: torch.dtype
    out: tuple  # (size, stride) of out, of the stats buffer, of the pooled partials (or None)
    stats: tuple
    partial: tuple | None
    tail: tuple  # the kernel's scalar arguments after the tensors: rstd_off, N, n_rows, strides, ..., eps pair
    finish: _FinishStatic | None  # pool with several token splits: the sum of the partials into out
    contiguous_out: bool  # out may be allocated with torch.empty_like(x3)
    #: the backward plan for a gradient laid out like out (contiguous, aligned), once a backward has needed it
    bwd: list


class BackwardPlan(NamedTuple):
    """Everything of a backward call that depends on shape, strides, dtype and alignment (B * N > 0)."""

    grid: tuple[int, int]
    meta: dict
    acc: torch.dtype
    dx: tuple  # (size, stride) of dx, of the partial buffer, of dweight/dbias, of dpe
    part: tuple
    param: tuple
    dpe: tuple
    tail: tuple  # the backward kernel's scalar arguments after the tensors: rstd_off, db_off, dpe_off, B, N, ...
    finish: _FinishStatic  # the fixed-order sum of the partials into dweight, dbias (and dpe)
    contiguous_dx: bool  # dx may be allocated with torch.empty_like(x3)
    gstrides: tuple  # the gradient strides this plan was made for
    programs: int
    splits: int


def _plan_forward(key: tuple) -> ForwardPlan:
    """The forward plan of a key of :func:`forward` (computed on a cache miss)."""
    if len(_FWD_PLANS) >= _PLANS_MAX:
        _FWD_PLANS.clear()
    (B, N, D), strides, dtype, addr_mod, has_pe, pool, stats, eps = key
    cfg = forward_config(D, dtype)
    acc = acc_dtype(dtype)
    vec = _row_vector_width(dtype, (B, N), (strides[:2],), (addr_mod,))
    meta = _kernel_meta(cfg, D, vec, dtype, has_pe, pool)
    meta["STATS"] = stats
    sv = _in_units(strides[:2], (B, N), vec)
    eps2 = _eps_pair(eps)
    if pool:
        tiles_per_prog, splits = _split(_cdiv(N, cfg.rows), B)
        stride_ys = 0 if splits == 1 else B * D
        finish = _finish_static(((0, splits, B * D, B * D),), acc) if splits > 1 else None
        grid = (B, splits)
        tail = (B * N, N, B * N, *sv, stride_ys, tiles_per_prog, *eps2)
        out, partial = _contig(B, D), (None if finish is None else _contig(splits, B, D))
    else:
        finish = None
        grid = (_cdiv(B * N, cfg.rows),)
        tail = (B * N, N, B * N, *sv, 0, 1, *eps2)
        out, partial = _contig(B, N, D), None
    contiguous = not pool and tuple(strides) == (N * D, D, 1)
    plan = ForwardPlan(grid, meta, acc, out, _contig(2 * B * N), partial, tail, finish, contiguous, [])
    _FWD_PLANS[key] = plan
    return plan


def forward(
    x3: torch.Tensor,
    pe: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    pool: bool,
    keep_stats: bool,
    launch: Callable[..., None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, ForwardPlan | None]:
    """The forward launcher: ``LN(x3) * weight + bias (+ pe)``, per token or averaged over tokens.

    Takes the op's contract (checked by the caller): x3 ``[B, N, D]`` with stride 1 in its last dim, pe ``[N, D]``
    contiguous or None, weight and bias ``[D]`` contiguous, one device. Returns ``(out, stats, plan)``: out
    ``[B, N, D]`` (``[B, D]`` when ``pool``) in x's dtype; stats one ``[2 * B * N]`` buffer (mean, then rstd) in the
    accumulation dtype when ``keep_stats`` (else None: the kernel skips them); plan, for :func:`backward`'s
    ``hint``. ``launch(kernel, grid, args, meta)`` runs each launch (default :func:`run_kernel`; ``wrap_triton``
    under ``torch.compile``; a recorder in the compile test).
    """
    shape = x3.shape
    dtype = x3.dtype
    dev = x3.device
    if not x3.numel():  # nothing to launch: the mean over zero tokens is zero, as the reference defines it
        B, N, D = shape
        out = torch.zeros((B, D), dtype=dtype, device=dev) if pool else torch.empty_like(x3)
        return out, (x3.new_empty(0, dtype=acc_dtype(dtype)) if keep_stats else None), None
    key = (shape, x3.stride(), dtype, _start_mod(x3), pe is not None, pool, keep_stats, eps)
    plan = _FWD_PLANS.get(key)
    if plan is None:
        plan = _plan_forward(key)
    out = torch.empty_like(x3) if plan.contiguous_out else _empty(*plan.out, dtype=dtype, device=dev)
    if keep_stats:
        stats = s = _empty(*plan.stats, dtype=plan.acc, device=dev)
    else:
        stats, s = None, out  # never written without STATS
    target = out if plan.partial is None else _empty(*plan.partial, dtype=plan.acc, device=dev)
    args = (x3, weight if pe is None else pe, weight, bias, target, s, s, *plan.tail)  # pe never read without HAS_PE
    if launch is None:
        launch = run_kernel
    with _device_guard(x3):
        launch(_ln_fwd_kernel, plan.grid, args, plan.meta)
        if plan.finish is not None:
            launch(_sum_partials_kernel, plan.finish.grid, _finish_args(plan.finish, target, (out,)),
                   plan.finish.meta)  # fmt: skip
    return out, stats, plan


def _plan_backward(key: tuple) -> BackwardPlan:
    """The backward plan of a key of :func:`backward` (computed on a cache miss)."""
    if len(_BWD_PLANS) >= _PLANS_MAX:
        _BWD_PLANS.clear()
    (B, N, D), xs, gs, dtype, x_mod, g_mod, has_pe, pool = key
    gs2 = (gs[0], 0) if pool else gs[:2]
    cfg = backward_config(D, dtype)
    acc = acc_dtype(dtype)
    vec = _row_vector_width(dtype, (B, N), (xs[:2], gs2), (x_mod, g_mod))
    n_tok = _cdiv(N, cfg.rows)
    b_per_prog, splits = _bwd_split(B, n_tok, dtype.itemsize, acc.itemsize)
    pitch_w = _cdiv(D, _PITCH) * _PITCH
    pitch_pe = _cdiv(N * D, _PITCH) * _PITCH
    programs = n_tok * splits
    db_off = programs * pitch_w
    dpe_off = 2 * programs * pitch_w
    part_numel = dpe_off + (splits * pitch_pe if has_pe else 0)
    meta = _kernel_meta(cfg, D, vec, dtype, has_pe, pool)
    tail = (B * N, db_off, dpe_off, B, N, *_in_units(xs[:2], (B, N), vec), *_in_units(gs2, (B, N), vec), b_per_prog,
            pitch_w, pitch_pe)  # fmt: skip
    segments = ((0, programs, pitch_w, D), (db_off, programs, pitch_w, D))
    if has_pe:
        segments += ((dpe_off, splits, pitch_pe, N * D),)
    plan = BackwardPlan(
        (n_tok, splits), meta, acc, _contig(B, N, D), _contig(part_numel), _contig(D), _contig(N, D), tail,
        _finish_static(segments, acc), tuple(xs) == (N * D, D, 1), tuple(gs), programs, splits,
    )  # fmt: skip
    _BWD_PLANS[key] = plan
    return plan


def backward(
    grad: torch.Tensor,
    x3: torch.Tensor,
    weight: torch.Tensor,
    stats: torch.Tensor,
    has_pe: bool,
    pool: bool,
    hint: ForwardPlan | None = None,
    launch: Callable[..., None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """The backward launcher: gradients of :func:`forward` from its ``stats``.

    grad is ``[B, N, D]`` (``[B, D]`` when ``pool``: every token receives ``grad[b] / N``), any strides (a copy
    only when its last dim is not contiguous). Returns (dx ``[B, N, D]`` contiguous in x's dtype, dpe ``[N, D]``
    or None without pe, dweight ``[D]``, dbias ``[D]``), the last three in the accumulation dtype. ``hint``: the
    forward's plan, which remembers the backward plan of a gradient laid out like the forward's output. Bitwise
    deterministic: the partial sums have a fixed layout for a given shape and are reduced in a fixed order.
    """
    dtype = x3.dtype
    dev = x3.device
    if not x3.numel():
        B, N, D = x3.shape
        acc = acc_dtype(dtype)
        dpe = torch.zeros((N, D), dtype=acc, device=dev) if has_pe else None
        return torch.empty_like(x3), dpe, torch.zeros(D, dtype=acc, device=dev), torch.zeros(D, dtype=acc, device=dev)
    gst = grad.stride()
    cached = None if hint is None or not hint.bwd else hint.bwd[0]
    if cached is not None and gst == cached.gstrides and _start_mod(grad) == 0:
        plan = cached
    else:
        shape = x3.shape
        if gst[-1] != 1 and shape[2] > 1:
            grad = grad.contiguous()
            gst = grad.stride()
        g_mod = _start_mod(grad)
        key = (shape, x3.stride(), gst, dtype, _start_mod(x3), g_mod, has_pe, pool)
        plan = _BWD_PLANS.get(key)
        if plan is None:
            plan = _plan_backward(key)
        if hint is not None and not hint.bwd and g_mod == 0 and gst == hint.out[1]:
            hint.bwd.append(plan)
    acc = plan.acc
    dx = torch.empty_like(x3) if plan.contiguous_dx else _empty(*plan.dx, dtype=dtype, device=dev)
    part = _empty(*plan.part, dtype=acc, device=dev)
    if weight.dtype == acc:  # (empty_like: the cheapest allocation call)
        dw = torch.empty_like(weight)
        db = torch.empty_like(weight)
    else:
        dw = _empty(*plan.param, dtype=acc, device=dev)
        db = _empty(*plan.param, dtype=acc, device=dev)
    dpe = _empty(*plan.dpe, dtype=acc, device=dev) if has_pe else None
    args = (x3, grad, weight, stats, stats, dx, part, *plan.tail)
    fin = plan.finish
    if launch is None:
        launch = run_kernel
    with _device_guard(x3):
        launch(_ln_bwd_kernel, plan.grid, args, plan.meta)
        launch(_sum_partials_kernel, fin.grid, _finish_args(fin, part, (dw, db) if dpe is None else (dw, db, dpe)),
               fin.meta)  # fmt: skip
    return dx, dpe, dw, db


def partial_traffic_ratio(B: int, N: int, D: int, dtype: torch.dtype, has_pe: bool = True) -> tuple[float, int]:
    """(bytes of the backward's partial buffers, written and read back, / its minimal bytes; programs).

    Minimal bytes: x and dy read and dx written in x's dtype, mean and rstd read, dweight, dbias (and dpe)
    written once in the accumulation dtype. Computed from the launch plan of a contiguous input.
    """
    es = dtype.itemsize
    acc_size = acc_dtype(dtype).itemsize
    plan = _plan_backward(((B, N, D), (N * D, D, 1), (N * D, D, 1), dtype, 0, 0, has_pe, False))
    partial = 2 * acc_size * plan.part[0][0]
    minimal = 3 * B * N * D * es + 2 * B * N * acc_size + acc_size * (2 * D + (N * D if has_pe else 0))
    return partial / minimal, plan.programs
