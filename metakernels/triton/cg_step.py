"""Triton kernels of metakernels::cg_step: one CG iteration of T systems, in place (rules in
metakernels/reference/cg_step.py).

Without a grid-wide barrier each dependent reduction ends a launch, so a call is three launches over a
(T, chunks) grid, each program owning one task's column chunk:

    1. pAp partials:  part[t, c] = p.Ap over the chunk                                  reads p, Ap
    2. alpha = rs / sum_c part[t, :] (every program of task t sums the same partials in the same order, so
       they agree bitwise); r -= alpha Ap; r.r partials                                reads r, Ap; writes r
    3. beta = r.r / rs; x += alpha p; p = r + beta p; program (t, 0) writes rs, status, iterations
                                                                                       reads x, p, r; writes x, p
The partial sums are a two-stage reduction through a [T, 2 * chunks + 2] float64 scratch (no atomics: the
result is deterministic and needs no zeroing launch); chunks are capped at MAX_CHUNKS so stage two is one
vector load. The per-task state (status, rs) is read by every program of launches 1 and 2 but written only by
program (t, 0) of launch 3, whose sibling programs read the copies that program (t, 0) of launch 2 saved in the
scratch instead, so no program reads a value another program of the same launch writes.

Dot products accumulate in float64 (as the C++ kernel); elementwise arithmetic is in the storage dtype.
stop_on_negative_curvature is a compile-time constant (STOP_ON_NEGATIVE) of launches 2 and 3, the two that
decide whether p.Ap allows a step: True stops a task on p.Ap <= 0, False (plain CG) only on p.Ap == 0.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._validation import check_cg_step_args
from ..reference.cg_step import CG_CONVERGED, CG_NEGATIVE_CURVATURE, CG_NONFINITE

BLOCK = 1024
MAX_CHUNKS = 256


@triton.jit
def _finite(v):
    return (v == v) & (tl.abs(v) != float("inf"))


@triton.jit
def _task_is_active(status_ptr, rs_ptr, threshold_ptr, task):
    """Status active, rs finite and above the threshold: the task takes (or tries) a step this call."""
    rs = tl.load(rs_ptr + task)
    active = (tl.load(status_ptr + task) == 0) & _finite(rs) & ~(rs <= tl.load(threshold_ptr + task))
    return active, rs


@triton.jit
def _reduced(scratch_ptr, row, first, num_chunks, CHUNKS_POW2: tl.constexpr):
    """sum_c scratch[row, first + c] for c < num_chunks, in a fixed order."""
    c = tl.arange(0, CHUNKS_POW2)
    return tl.sum(tl.load(scratch_ptr + row + first + c, mask=c < num_chunks, other=0.0), axis=0)


@triton.jit
def _breakdown(pap, STOP_ON_NEGATIVE: tl.constexpr):
    """A finite p.Ap on which the task stops with CG_NEGATIVE_CURVATURE: <= 0 (stop rule) or == 0 (plain CG)."""
    if STOP_ON_NEGATIVE:
        stops = ~(pap > 0)
    else:
        stops = pap == 0
    return _finite(pap) & stops


@triton.jit
def _alpha(pap, rs, dtype: tl.constexpr, STOP_ON_NEGATIVE: tl.constexpr):
    usable = _finite(pap) & ~_breakdown(pap, STOP_ON_NEGATIVE)
    alpha = (rs / tl.where(usable, pap, 1.0)).to(dtype)
    return alpha, usable & _finite(alpha)


@triton.jit
def _cg_pap_kernel(
    p_ptr,
    ap_ptr,
    status_ptr,
    rs_ptr,
    threshold_ptr,
    scratch_ptr,
    num_params,
    chunk,
    num_chunks,
    BLOCK_SIZE: tl.constexpr,
):
    task, c = tl.program_id(0), tl.program_id(1)
    active, _ = _task_is_active(status_ptr, rs_ptr, threshold_ptr, task)
    acc = tl.zeros([BLOCK_SIZE], dtype=tl.float64)
    for start in range(0, chunk, BLOCK_SIZE):
        cols = c * chunk + start + tl.arange(0, BLOCK_SIZE)
        mask = (cols < num_params) & active
        at = task * num_params + cols
        p = tl.load(p_ptr + at, mask=mask, other=0.0).to(tl.float64)
        acc += p * tl.load(ap_ptr + at, mask=mask, other=0.0).to(tl.float64)
    tl.store(scratch_ptr + task * (2 * num_chunks + 2) + c, tl.sum(acc, axis=0))


@triton.jit
def _cg_residual_kernel(
    r_ptr,
    ap_ptr,
    status_ptr,
    rs_ptr,
    threshold_ptr,
    scratch_ptr,
    num_params,
    chunk,
    num_chunks,
    BLOCK_SIZE: tl.constexpr,
    CHUNKS_POW2: tl.constexpr,
    STOP_ON_NEGATIVE: tl.constexpr,
):
    task, c = tl.program_id(0), tl.program_id(1)
    row = task * (2 * num_chunks + 2)
    active, rs = _task_is_active(status_ptr, rs_ptr, threshold_ptr, task)
    pap = _reduced(scratch_ptr, row, 0, num_chunks, CHUNKS_POW2)
    alpha, ok = _alpha(pap, rs, r_ptr.dtype.element_ty, STOP_ON_NEGATIVE)
    step = active & ok
    acc = tl.zeros([BLOCK_SIZE], dtype=tl.float64)
    for start in range(0, chunk, BLOCK_SIZE):
        cols = c * chunk + start + tl.arange(0, BLOCK_SIZE)
        mask = (cols < num_params) & step
        at = task * num_params + cols
        r = tl.load(r_ptr + at, mask=mask, other=0.0)
        r = r - alpha * tl.load(ap_ptr + at, mask=mask, other=0.0)
        tl.store(r_ptr + at, r, mask=mask)
        r64 = r.to(tl.float64)
        acc += r64 * r64
    tl.store(scratch_ptr + row + num_chunks + c, tl.sum(acc, axis=0))
    if c == 0:  # the state launch 3 needs, saved before its program (t, 0) overwrites rs and status
        tl.store(scratch_ptr + row + 2 * num_chunks, rs)
        tl.store(scratch_ptr + row + 2 * num_chunks + 1, active.to(tl.float64))


@triton.jit
def _cg_direction_kernel(
    x_ptr,
    p_ptr,
    r_ptr,
    status_ptr,
    rs_ptr,
    iterations_ptr,
    threshold_ptr,
    scratch_ptr,
    num_params,
    chunk,
    num_chunks,
    BLOCK_SIZE: tl.constexpr,
    CHUNKS_POW2: tl.constexpr,
    CONVERGED: tl.constexpr,
    NEGATIVE_CURVATURE: tl.constexpr,
    NONFINITE: tl.constexpr,
    STOP_ON_NEGATIVE: tl.constexpr,
):
    task, c = tl.program_id(0), tl.program_id(1)
    row = task * (2 * num_chunks + 2)
    rs = tl.load(scratch_ptr + row + 2 * num_chunks)
    active = tl.load(scratch_ptr + row + 2 * num_chunks + 1) != 0.0
    pap = _reduced(scratch_ptr, row, 0, num_chunks, CHUNKS_POW2)
    alpha, ok = _alpha(pap, rs, x_ptr.dtype.element_ty, STOP_ON_NEGATIVE)
    step = active & ok
    rr = _reduced(scratch_ptr, row, num_chunks, num_chunks, CHUNKS_POW2)
    accept = step & _finite(rr)
    beta = (rr / tl.where(accept, rs, 1.0)).to(x_ptr.dtype.element_ty)
    turn = accept & _finite(beta)
    for start in range(0, chunk, BLOCK_SIZE):
        cols = c * chunk + start + tl.arange(0, BLOCK_SIZE)
        # (scalar flags join block masks as int32 != 0: the interpreter's numpy & rejects some bool scalars)
        mask = (cols < num_params) & (accept.to(tl.int32) != 0)
        at = task * num_params + cols
        p = tl.load(p_ptr + at, mask=mask, other=0.0)
        tl.store(x_ptr + at, tl.load(x_ptr + at, mask=mask, other=0.0) + alpha * p, mask=mask)
        turn_mask = mask & (turn.to(tl.int32) != 0)
        tl.store(p_ptr + at, tl.load(r_ptr + at, mask=turn_mask, other=0.0) + beta * p, mask=turn_mask)
    if c == 0:
        threshold = tl.load(threshold_ptr + task)
        status = tl.load(status_ptr + task)
        was_active = status == 0
        converged = accept & (rr <= threshold)
        new = tl.where(turn | converged, 0, NONFINITE)  # accepted; no direction for the next step
        new = tl.where(converged, CONVERGED, new)
        new = tl.where(accept, new, NONFINITE)  # step rejected: a non-finite r.r or alpha ...
        new = tl.where(_breakdown(pap, STOP_ON_NEGATIVE), NEGATIVE_CURVATURE, new)  # ... or p.Ap's breakdown
        new = tl.where(active, new, tl.where(_finite(rs), CONVERGED, NONFINITE))  # stopped before the step
        tl.store(status_ptr + task, tl.where(was_active, new, status).to(status.dtype))
        tl.store(rs_ptr + task, tl.where(accept, rr, rs))
        tl.store(iterations_ptr + task, tl.load(iterations_ptr + task) + accept.to(tl.int64))


def _chunking(num_params: int) -> tuple[int, int]:
    """(columns per program, programs per task): at most MAX_CHUNKS programs per task, whole BLOCKs each."""
    per_program = triton.cdiv(triton.cdiv(num_params, MAX_CHUNKS), BLOCK) * BLOCK
    return per_program, triton.cdiv(num_params, per_program)


def cg_step(
    x: torch.Tensor,
    r: torch.Tensor,
    p: torch.Tensor,
    Ap: torch.Tensor,
    rs: torch.Tensor,
    status: torch.Tensor,
    iterations: torch.Tensor,
    threshold: torch.Tensor,
    stop_on_negative_curvature: bool = True,
) -> None:
    check_cg_step_args(x, r, p, Ap, rs, status, iterations, threshold, stop_on_negative_curvature)
    Ap, threshold = Ap.contiguous(), threshold.contiguous()
    num_tasks, num_params = x.shape
    chunk, num_chunks = _chunking(num_params)
    chunks_pow2 = triton.next_power_of_2(num_chunks)
    scratch = torch.empty(num_tasks, 2 * num_chunks + 2, dtype=torch.float64, device=x.device)
    grid = (num_tasks, num_chunks)
    _cg_pap_kernel[grid](p, Ap, status, rs, threshold, scratch, num_params, chunk, num_chunks, BLOCK_SIZE=BLOCK)
    _cg_residual_kernel[grid](
        r,
        Ap,
        status,
        rs,
        threshold,
        scratch,
        num_params,
        chunk,
        num_chunks,
        BLOCK_SIZE=BLOCK,
        CHUNKS_POW2=chunks_pow2,
        STOP_ON_NEGATIVE=stop_on_negative_curvature,
    )
    _cg_direction_kernel[grid](
        x,
        p,
        r,
        status,
        rs,
        iterations,
        threshold,
        scratch,
        num_params,
        chunk,
        num_chunks,
        BLOCK_SIZE=BLOCK,
        CHUNKS_POW2=chunks_pow2,
        CONVERGED=CG_CONVERGED,
        NEGATIVE_CURVATURE=CG_NEGATIVE_CURVATURE,
        NONFINITE=CG_NONFINITE,
        STOP_ON_NEGATIVE=stop_on_negative_curvature,
    )
