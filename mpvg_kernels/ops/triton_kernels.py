"""Triton kernels for the ``mpvg::`` ops: fused LayerNorm (+ position embedding) (+ mean pooling).

The launchers :func:`forward` and :func:`backward` follow the kernel contract of ``reference.forward`` /
``reference.backward`` (see there): ``x3`` is ``[B, N, D]`` with stride 1 in the last dim and any strides in
the first two, ``pe`` an ``[N, D]`` tensor indexed by token (never expanded over the batch).

One forward kernel and one backward kernel serve every variant through constexpr flags:

- ``_ln_fwd_kernel``: ``HAS_PE`` adds ``pe[n]``; ``POOL`` averages over tokens instead of writing per-token
  output. Per-token mode: each program normalises ``ROWS`` consecutive rows (a ``[ROWS, BLOCK_D]`` tile),
  reading x once and writing y once. Pool mode: program ``(b, s)`` walks split ``s`` of batch element ``b``'s
  tokens in tiles and writes one fp32 partial ``[D]`` (or, with a single split, the output row itself).
- ``_ln_bwd_kernel``: program ``(t, s)`` owns ``ROWS`` tokens and loops over batch chunk ``s``; it writes dx
  and fixed-order partial sums for dweight, dbias (``[programs, D]``) and dpe (``[splits, N, D]``). A
  ``torch.sum`` over the partial dim finishes them. No atomics: results are bitwise reproducible.

Statistics and accumulation are float32 (float64 when x is float64). Tile sizes and warp counts come from
the pure functions :func:`forward_config` / :func:`backward_config` of ``D`` and dtype; split counts from
the shape only, so a given shape always runs the same reduction order (and no autotuning happens, which
keeps the launches CUDA-graph friendly). Importing this module needs no GPU.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .reference import acc_dtype

__all__ = [
    "MAX_D",
    "BackwardPlan",
    "ForwardPlan",
    "KernelConfig",
    "Launch",
    "backward",
    "backward_config",
    "forward",
    "forward_config",
    "plan_backward",
    "plan_forward",
]

#: Largest feature dim the single-tile-per-row kernels accept.
MAX_D = 65536

# Elements of one [ROWS, BLOCK_D] tile (halved for float64), and tile elements per thread. Eight elements
# per thread is one 16-byte load of bf16/fp16 or two of fp32, and keeps both kernels far from spilling
# (the backward holds x, dy and two accumulator tiles); checked by tests/ops/test_triton_compile.py.
_TILE = 2048
_ELEMS_PER_THREAD = 8
_MAX_ROWS = 64
_MAX_WARPS = 32
# Programs a launch aims for when it splits work for parallelism (pool forward, backward batch splits).
# A constant, not the SM count: split counts (hence summation order) must depend on the shape alone.
_TARGET_PROGRAMS = 1024


class KernelConfig(NamedTuple):
    """Launch parameters of one kernel: padded feature width, rows per tile, warps per program."""

    block_d: int
    rows: int
    num_warps: int


def _config(D: int, dtype: torch.dtype) -> KernelConfig:
    tile = _TILE // 2 if dtype == torch.float64 else _TILE
    block_d = triton.next_power_of_2(max(int(D), 1))
    rows = max(1, min(_MAX_ROWS, tile // block_d))
    num_warps = max(1, min(_MAX_WARPS, rows * block_d // (32 * _ELEMS_PER_THREAD)))
    return KernelConfig(block_d, rows, num_warps)


def forward_config(D: int, dtype: torch.dtype) -> KernelConfig:
    """Tile and warp heuristic of the forward kernel (per-token and pooled) for feature dim D and x dtype."""
    return _config(D, dtype)


def backward_config(D: int, dtype: torch.dtype) -> KernelConfig:
    """Tile and warp heuristic of the backward kernel for feature dim D and x dtype."""
    return _config(D, dtype)


def _split(units: int, others: int) -> tuple[int, int]:
    """Cut ``units`` work items into chunks so that ``others * chunks`` approaches the target program count.

    Returns (items per chunk, number of chunks); a pure function of its arguments.
    """
    want = max(1, min(units, triton.cdiv(_TARGET_PROGRAMS, max(others, 1))))
    per = triton.cdiv(units, want)
    return per, triton.cdiv(units, per)


def _tl_acc(dtype: torch.dtype) -> tl.dtype:
    return tl.float64 if dtype == torch.float64 else tl.float32


def _device_guard(t: torch.Tensor) -> contextlib.AbstractContextManager:
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _check_x3(x3: torch.Tensor) -> None:
    if x3.dim() != 3:
        raise ValueError(f"x3 must be [B, N, D], got shape {tuple(x3.shape)}")
    if x3.shape[2] > 1 and x3.numel() > 0 and x3.stride(2) != 1:
        raise ValueError(f"x3 must have stride 1 in its last dim, got strides {x3.stride()}")
    if x3.shape[2] > MAX_D:
        raise ValueError(f"the Triton kernels support D <= {MAX_D}, got D = {x3.shape[2]}")


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
    X,  # [B, N, D] input, row address b * stride_xb + n * stride_xn
    PE,  # [N, D] contiguous (read only when HAS_PE)
    W,  # [D]
    Bias,  # [D]
    Y,  # per-token: [B*N, D] contiguous; pool: [splits, B, D] at s * stride_ys + b * stride_yb
    Mean,  # [B*N]
    Rstd,  # [B*N]
    N,
    D,
    n_rows,  # B * N
    stride_xb,
    stride_xn,
    stride_ys,
    stride_yb,
    tiles_per_prog,  # pool: token tiles handled by one program
    eps,
    inv_n,  # pool: 1 / N
    HAS_PE: tl.constexpr,
    POOL: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    cols = tl.arange(0, BLOCK_D)
    col_mask = cols < D
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(ACC_DTYPE)
    bias = tl.load(Bias + cols, mask=col_mask, other=0.0).to(ACC_DTYPE)
    if POOL:
        b = tl.program_id(0).to(tl.int64)
        n0 = tl.program_id(1).to(tl.int64) * tiles_per_prog * ROWS
        acc = tl.zeros([ROWS, BLOCK_D], dtype=ACC_DTYPE)
        for t in range(0, tiles_per_prog):
            n = n0 + t * ROWS + tl.arange(0, ROWS).to(tl.int64)
            row_mask = n < N
            mask = row_mask[:, None] & col_mask[None, :]
            x_ptrs = X + (b * stride_xb + n * stride_xn)[:, None] + cols[None, :]
            x = tl.load(x_ptrs, mask=mask, other=0.0).to(ACC_DTYPE)
            mean = tl.sum(x, axis=1) / D
            xc = tl.where(mask, x - mean[:, None], 0.0)
            rstd = _rstd(tl.sum(xc * xc, axis=1) / D + eps, ACC_DTYPE)
            rows = b * N + n
            tl.store(Mean + rows, mean.to(Mean.dtype.element_ty), mask=row_mask)
            tl.store(Rstd + rows, rstd.to(Rstd.dtype.element_ty), mask=row_mask)
            y = xc * rstd[:, None] * w[None, :] + bias[None, :]
            if HAS_PE:
                pe = tl.load(PE + n[:, None] * D + cols[None, :], mask=mask, other=0.0)
                y += pe.to(ACC_DTYPE)
            acc += tl.where(mask, y, 0.0)
        out = tl.sum(acc, axis=0) * inv_n
        y_ptrs = Y + tl.program_id(1).to(tl.int64) * stride_ys + b * stride_yb + cols
        tl.store(y_ptrs, out.to(Y.dtype.element_ty), mask=col_mask)
    else:
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)
        row_mask = rows < n_rows
        b = rows // N
        n = rows - b * N
        mask = row_mask[:, None] & col_mask[None, :]
        x_ptrs = X + (b * stride_xb + n * stride_xn)[:, None] + cols[None, :]
        x = tl.load(x_ptrs, mask=mask, other=0.0).to(ACC_DTYPE)
        mean = tl.sum(x, axis=1) / D
        xc = tl.where(mask, x - mean[:, None], 0.0)
        rstd = _rstd(tl.sum(xc * xc, axis=1) / D + eps, ACC_DTYPE)
        tl.store(Mean + rows, mean.to(Mean.dtype.element_ty), mask=row_mask)
        tl.store(Rstd + rows, rstd.to(Rstd.dtype.element_ty), mask=row_mask)
        y = xc * rstd[:, None] * w[None, :] + bias[None, :]
        if HAS_PE:
            pe = tl.load(PE + n[:, None] * D + cols[None, :], mask=mask, other=0.0)
            y += pe.to(ACC_DTYPE)
        tl.store(Y + rows[:, None] * D + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _ln_bwd_kernel(
    X,  # [B, N, D] input, row address b * stride_xb + n * stride_xn
    G,  # per-token: [B, N, D] upstream gradient; pool: [B, D] (stride_gn unused)
    W,  # [D]
    Mean,  # [B*N]
    Rstd,  # [B*N]
    DX,  # [B*N, D] contiguous
    DPE,  # [splits, N, D] partials (written only when HAS_PE)
    DW,  # [programs, D] partials
    DB,  # [programs, D] partials
    B,
    N,
    D,
    stride_xb,
    stride_xn,
    stride_gb,
    stride_gn,
    b_per_prog,  # batch elements handled by one program
    inv_n,  # pool: 1 / N
    HAS_PE: tl.constexpr,
    POOL: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_s = tl.program_id(1)
    n = pid_t.to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)
    row_mask = n < N
    cols = tl.arange(0, BLOCK_D)
    col_mask = cols < D
    mask = row_mask[:, None] & col_mask[None, :]
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(ACC_DTYPE)
    acc_dw = tl.zeros([ROWS, BLOCK_D], dtype=ACC_DTYPE)
    if POOL:
        # Every token of batch element b receives the same dy = grad[b] / N: accumulate it once per column.
        acc_g = tl.zeros([BLOCK_D], dtype=ACC_DTYPE)
    else:
        acc_db = tl.zeros([ROWS, BLOCK_D], dtype=ACC_DTYPE)
    # int64 loop bounds make the loop variable (hence every offset built from it) int64.
    b_start = pid_s.to(tl.int64) * b_per_prog
    b_end = tl.minimum(b_start + b_per_prog, B)
    for b in range(b_start, b_end):
        rows = b * N + n
        mean = tl.load(Mean + rows, mask=row_mask, other=0.0).to(ACC_DTYPE)
        rstd = tl.load(Rstd + rows, mask=row_mask, other=0.0).to(ACC_DTYPE)
        x_ptrs = X + (b * stride_xb + n * stride_xn)[:, None] + cols[None, :]
        x = tl.load(x_ptrs, mask=mask, other=0.0).to(ACC_DTYPE)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        if POOL:
            g = tl.load(G + b * stride_gb + cols, mask=col_mask, other=0.0).to(ACC_DTYPE) * inv_n
            wg = w * g
            c1 = tl.sum(xhat * wg[None, :], axis=1) / D
            c2 = tl.sum(wg, axis=0) / D
            dx = (wg[None, :] - (xhat * c1[:, None] + c2)) * rstd[:, None]
            acc_dw += g[None, :] * xhat  # xhat is 0 on padding rows and columns
            acc_g += g
        else:
            g_ptrs = G + (b * stride_gb + n * stride_gn)[:, None] + cols[None, :]
            dy = tl.load(g_ptrs, mask=mask, other=0.0).to(ACC_DTYPE)
            wdy = dy * w[None, :]
            c1 = tl.sum(xhat * wdy, axis=1) / D
            c2 = tl.sum(wdy, axis=1) / D
            dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
            acc_dw += dy * xhat
            acc_db += dy
        tl.store(DX + rows[:, None] * D + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
    prog = pid_s.to(tl.int64) * tl.num_programs(0) + pid_t
    tl.store(DW + prog * D + cols, tl.sum(acc_dw, axis=0), mask=col_mask)
    if POOL:
        n_valid = tl.minimum(N - pid_t * ROWS, ROWS)
        tl.store(DB + prog * D + cols, acc_g * n_valid, mask=col_mask)
        dpe_tile = tl.where(mask, acc_g[None, :], 0.0)
    else:
        tl.store(DB + prog * D + cols, tl.sum(acc_db, axis=0), mask=col_mask)
        dpe_tile = acc_db
    if HAS_PE:
        dpe_ptrs = DPE + (pid_s.to(tl.int64) * N + n)[:, None] * D + cols[None, :]
        tl.store(dpe_ptrs, dpe_tile, mask=mask)


# ----------------------------------------------------------------------------------------------- launchers


class Launch(NamedTuple):
    """One planned kernel launch: ``kernel[grid](*args, **meta)``; ``meta`` holds constexprs and num_warps.

    Planning is separate from launching so that the ahead-of-time compile test can derive exactly the
    specialisation the JIT sees (argument values, constexprs, warps) from the launcher's own code.
    """

    kernel: triton.JITFunction
    grid: tuple[int, ...]
    args: tuple
    meta: dict

    def __call__(self) -> None:
        self.kernel[self.grid](*self.args, **self.meta)


class ForwardPlan(NamedTuple):
    """Buffers and launch of one forward call; ``launch`` is None when there is nothing to compute."""

    launch: Launch | None
    out: torch.Tensor
    mean: torch.Tensor
    rstd: torch.Tensor
    partial: torch.Tensor | None  # pool with several token splits: [splits, B, D], summed into out


class BackwardPlan(NamedTuple):
    """Buffers and launch of one backward call; ``launch`` is None when there is nothing to compute."""

    launch: Launch | None
    dx: torch.Tensor
    dpe_part: torch.Tensor | None  # [splits, N, D]
    dw_part: torch.Tensor  # [programs, D]
    db_part: torch.Tensor  # [programs, D]


def plan_forward(
    x3: torch.Tensor,
    pe: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    pool: bool,
) -> ForwardPlan:
    """Allocate the outputs of :func:`forward` and describe its kernel launch (works on meta tensors)."""
    _check_x3(x3)
    B, N, D = x3.shape
    acc = acc_dtype(x3.dtype)
    dev = x3.device
    mean = torch.empty(B * N, dtype=acc, device=dev)
    rstd = torch.empty(B * N, dtype=acc, device=dev)
    out = torch.empty((B, D) if pool else (B, N, D), dtype=x3.dtype, device=dev)
    if B * N == 0:
        return ForwardPlan(None, out, mean, rstd, None)
    if pe is not None:
        pe = pe.reshape(N, D).contiguous()
    weight, bias = weight.contiguous(), bias.contiguous()
    cfg = forward_config(D, x3.dtype)
    meta = dict(
        HAS_PE=pe is not None,
        POOL=pool,
        ROWS=cfg.rows,
        BLOCK_D=cfg.block_d,
        ACC_DTYPE=_tl_acc(x3.dtype),
        num_warps=cfg.num_warps,
    )
    pe_arg = pe if pe is not None else weight  # never read without HAS_PE
    partial = None
    if pool:
        tiles_per_prog, splits = _split(triton.cdiv(N, cfg.rows), B)
        partial = None if splits == 1 else torch.empty((splits, B, D), dtype=acc, device=dev)
        target = out if partial is None else partial
        stride_ys = 0 if partial is None else partial.stride(0)
        grid: tuple[int, ...] = (B, splits)
        args = (
            x3, pe_arg, weight, bias, target, mean, rstd,
            N, D, B * N, x3.stride(0), x3.stride(1), stride_ys, D,
            tiles_per_prog, eps, 1.0 / N,
        )  # fmt: skip
    else:
        grid = (triton.cdiv(B * N, cfg.rows),)
        args = (
            x3, pe_arg, weight, bias, out, mean, rstd,
            N, D, B * N, x3.stride(0), x3.stride(1), 0, 0,
            1, eps, 1.0,
        )  # fmt: skip
    return ForwardPlan(Launch(_ln_fwd_kernel, grid, args, meta), out, mean, rstd, partial)


def forward(
    x3: torch.Tensor,
    pe: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    pool: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused ``LN(x) * weight + bias (+ pe)``, per token or averaged over tokens; see ``reference.forward``.

    Returns (out, mean, rstd): out is ``[B, N, D]`` contiguous (``[B, D]`` when ``pool``) in x's dtype;
    mean and rstd are ``[B*N]`` in the accumulation dtype (float32, float64 for float64 x).
    """
    plan = plan_forward(x3, pe, weight, bias, eps, pool)
    if plan.launch is None:
        if pool:
            plan.out.zero_()  # the mean over zero tokens, as the reference defines it
        return plan.out, plan.mean, plan.rstd
    with _device_guard(x3):
        plan.launch()
        if plan.partial is not None:
            plan.out.copy_(plan.partial.sum(0))
    return plan.out, plan.mean, plan.rstd


def plan_backward(
    grad: torch.Tensor,
    x3: torch.Tensor,
    weight: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    has_pe: bool,
    pool: bool,
) -> BackwardPlan:
    """Allocate dx and the partial-sum buffers of :func:`backward` and describe its kernel launch."""
    _check_x3(x3)
    B, N, D = x3.shape
    acc = acc_dtype(x3.dtype)
    dev = x3.device
    dx = torch.empty((B, N, D), dtype=x3.dtype, device=dev)
    if B * N == 0:
        dpe_part = torch.zeros((1, N, D), dtype=acc, device=dev) if has_pe else None
        zeros = torch.zeros((1, D), dtype=acc, device=dev)
        return BackwardPlan(None, dx, dpe_part, zeros, zeros)
    if grad.stride(-1) != 1:
        grad = grad.contiguous()
    weight = weight.contiguous()
    cfg = backward_config(D, x3.dtype)
    n_tok = triton.cdiv(N, cfg.rows)
    b_per_prog, splits = _split(B, n_tok)
    dw_part = torch.empty((splits * n_tok, D), dtype=acc, device=dev)
    db_part = torch.empty((splits * n_tok, D), dtype=acc, device=dev)
    dpe_part = torch.empty((splits, N, D), dtype=acc, device=dev) if has_pe else None
    meta = dict(
        HAS_PE=has_pe,
        POOL=pool,
        ROWS=cfg.rows,
        BLOCK_D=cfg.block_d,
        ACC_DTYPE=_tl_acc(x3.dtype),
        num_warps=cfg.num_warps,
    )
    args = (
        x3, grad, weight, mean, rstd, dx, dw_part if dpe_part is None else dpe_part, dw_part, db_part,
        B, N, D, x3.stride(0), x3.stride(1), grad.stride(0), 0 if pool else grad.stride(1),
        b_per_prog, 1.0 / N,
    )  # fmt: skip
    return BackwardPlan(Launch(_ln_bwd_kernel, (n_tok, splits), args, meta), dx, dpe_part, dw_part, db_part)


def backward(
    grad: torch.Tensor,
    x3: torch.Tensor,
    weight: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    has_pe: bool,
    pool: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`forward`; see ``reference.backward``.

    grad is ``[B, N, D]`` (``[B, D]`` when ``pool``: every token receives ``grad[b] / N``). Returns
    (dx ``[B, N, D]`` contiguous in x's dtype, dpe ``[N, D]`` or an empty ``[0]`` when not ``has_pe``,
    dweight ``[D]``, dbias ``[D]``), the last three in the accumulation dtype. Bitwise deterministic: the
    partial sums have a fixed layout for a given shape and are reduced by ``torch.sum`` in a fixed order.
    """
    plan = plan_backward(grad, x3, weight, mean, rstd, has_pe, pool)
    with _device_guard(x3):
        if plan.launch is not None:
            plan.launch()
        if plan.dpe_part is None:
            dpe = torch.zeros(0, dtype=plan.dw_part.dtype, device=x3.device)
        elif plan.dpe_part.shape[0] == 1:
            dpe = plan.dpe_part[0]
        else:
            dpe = plan.dpe_part.sum(0)
        dw = plan.dw_part.sum(0)
        db = plan.db_part.sum(0)
    return plan.dx, dpe, dw, db
