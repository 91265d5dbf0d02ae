"""Triton kernels of metakernels::task_linear and task_linear_backward (math: metakernels/reference/task_linear.py).

One task-batched GEMM kernel with a bias + activation epilogue serves both layer ops: operands are addressed
by (task, row, column) strides from a base pointer plus an element offset, so a weight inside the flat
[T, P] parameter batch, its transpose, and the transpose of an activation are all operands without copies.
Blocks of 32 (tl.dot needs at least 16 per dimension); masked loads pad the edges with zeros. Arithmetic is
float32 (tl.dot with input_precision="ieee": no TF32 rounding on tensor-core GPUs) or float64 for float64
inputs. The elementwise activation derivative and the bias-gradient reduction are small kernels of their own.

The interpreter (TRITON_INTERPRET=1) ignores strides of the tensors it is given, so the launchers pass
contiguous tensors and explicit strides.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..reference.task_linear import check_task_linear_args, check_task_linear_backward_args

BLOCK = 32
ELEMENTWISE_BLOCK = 1024
ACT_CODES = {"identity": 0, "relu": 1, "tanh": 2}
INIT_ZERO, INIT_ACCUMULATE, INIT_ROW_BIAS, INIT_COLUMN_BIAS = 0, 1, 2, 3


@triton.jit
def _tanh(x):
    """tanh to a few ulp relative, also near 0: tanh|x| = -m / (2 + m) with m = expm1(-2|x|) in (-1, 0].

    There is no expm1 in Triton (nor tanh in the interpreter); (1 - e) / (1 + e) with e = exp(-2|x|) loses
    the relative accuracy of small results (absolute error ~eps). Kahan's expm1: with u = exp(y) rounded,
    (u - 1) * y / log(u) is accurate to a few ulp (y itself when u rounds to 1).
    """
    y = -2.0 * tl.abs(x)
    u = tl.exp(y)
    # |x| > 20: tanh rounds to 1 in float32 and float64, and u may be subnormal (inexact log) or 0
    big = y < -40.0
    safe = tl.where((u == 1.0) | big, 0.5, u)  # no log(0), 0 / 0 or subnormal log in the lanes replaced below
    m = tl.where(u == 1.0, y, (safe - 1.0) * y / tl.log(safe))
    m = tl.where(big, -1.0, m)
    t = -m / (2.0 + m)
    return tl.where(x < 0, -t, t)


@triton.jit
def _gemm_kernel(
    a_ptr, a_off, a_ts, a_rs, a_cs,
    b_ptr, b_off, b_ts, b_rs, b_cs,
    c_ptr, c_off, c_ts, c_rs,
    bias_ptr, bias_off, bias_ts,
    M, N, K,
    INIT: tl.constexpr, ACT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """C[t] = act(init + A[t] @ B[t]) for the task t = program_id(0).

    X[t][i, j] = x_ptr[x_off + t * x_ts + i * x_rs + j * x_cs] for X = A, B (C: unit column stride)."""
    task = tl.program_id(0)
    rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    probe = tl.load(a_ptr + a_off)
    acc_type = tl.float64 if probe.dtype == tl.float64 else tl.float32
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=acc_type)
    a_base = a_ptr + a_off + task * a_ts
    b_base = b_ptr + b_off + task * b_ts
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_base + rm[:, None] * a_rs + rk[None, :] * a_cs, mask=(rm[:, None] < M) & (rk[None, :] < K),
                    other=0.0).to(acc_type)
        b = tl.load(b_base + rk[:, None] * b_rs + rn[None, :] * b_cs, mask=(rk[:, None] < K) & (rn[None, :] < N),
                    other=0.0).to(acc_type)
        acc += tl.dot(a, b, input_precision="ieee")
    c_ptrs = c_ptr + c_off + task * c_ts + rm[:, None] * c_rs + rn[None, :]
    c_mask = (rm[:, None] < M) & (rn[None, :] < N)
    if INIT == 1:
        acc += tl.load(c_ptrs, mask=c_mask, other=0.0).to(acc_type)
    if INIT == 2:
        acc += tl.load(bias_ptr + bias_off + task * bias_ts + rm, mask=rm < M, other=0.0).to(acc_type)[:, None]
    if INIT == 3:
        acc += tl.load(bias_ptr + bias_off + task * bias_ts + rn, mask=rn < N, other=0.0).to(acc_type)[None, :]
    if ACT == 1:
        acc = tl.where(acc < 0, 0.0, acc)  # keeps NaN, as torch.relu
    if ACT == 2:
        acc = _tanh(acc)
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)


def gemm(
    tasks: int, m: int, n: int, k: int,
    a: torch.Tensor, a_strides: tuple[int, int, int],
    b: torch.Tensor, b_strides: tuple[int, int, int],
    c: torch.Tensor, c_strides: tuple[int, int],
    *, a_off: int = 0, b_off: int = 0, c_off: int = 0,
    init: int = INIT_ZERO, bias: torch.Tensor | None = None, bias_off: int = 0, bias_ts: int = 0,
    activation: str = "identity",
) -> None:
    """C[t] = act(init + A[t] @ B[t]) for every task, into c (contiguous base tensors; strides in elements:
    a/b (task, row, column), c (task, row) with unit column stride)."""
    grid = (tasks, triton.cdiv(m, BLOCK), triton.cdiv(n, BLOCK))
    _gemm_kernel[grid](
        a, a_off, *a_strides, b, b_off, *b_strides, c, c_off, *c_strides,
        bias if bias is not None else c, bias_off, bias_ts,
        m, n, k, INIT=init, ACT=ACT_CODES[activation], BLOCK_M=BLOCK, BLOCK_N=BLOCK, BLOCK_K=BLOCK,
    )


@triton.jit
def _activation_grad_kernel(g_ptr, h_ptr, out_ptr, numel, ACT: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """out = g * act'(z), the derivative read from h = act(z) (relu selects, as threshold_backward)."""
    offs = tl.program_id(0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < numel
    g = tl.load(g_ptr + offs, mask=mask, other=0.0)
    h = tl.load(h_ptr + offs, mask=mask, other=0.0)
    if ACT == 1:
        g = tl.where(h > 0, g, 0.0)
    if ACT == 2:
        g = g * (1.0 - h * h)
    tl.store(out_ptr + offs, g.to(out_ptr.dtype.element_ty), mask=mask)


def activation_grad(grad: torch.Tensor, h: torch.Tensor, activation: str) -> torch.Tensor:
    """grad * act'(z) from h = act(z); contiguous inputs of one shape."""
    if activation == "identity":
        return grad
    out = torch.empty_like(grad)
    numel = grad.numel()
    _activation_grad_kernel[(triton.cdiv(numel, ELEMENTWISE_BLOCK),)](
        grad, h, out, numel, ACT=ACT_CODES[activation], BLOCK_SIZE=ELEMENTWISE_BLOCK
    )
    return out


@triton.jit
def _column_sum_kernel(d_ptr, out_ptr, out_off, out_ts, rows, cols, BLOCK_SIZE: tl.constexpr):
    """out[t, j] = sum_i d[t, i, j] for a contiguous d [T, rows, cols]; one program per (task, column block)."""
    task = tl.program_id(0)
    rc = tl.program_id(1) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = rc < cols
    probe = tl.load(d_ptr)
    acc_type = tl.float64 if probe.dtype == tl.float64 else tl.float32
    acc = tl.zeros([BLOCK_SIZE], dtype=acc_type)
    base = d_ptr + task * rows * cols
    for i in range(rows):
        acc += tl.load(base + i * cols + rc, mask=mask, other=0.0).to(acc_type)
    tl.store(out_ptr + out_off + task * out_ts + rc, acc.to(out_ptr.dtype.element_ty), mask=mask)


def column_sums(d: torch.Tensor, out: torch.Tensor, out_off: int = 0, out_ts: int | None = None) -> None:
    """out[t, j] (at out_off + t * out_ts + j) = sum_i d[t, i, j] for a contiguous d [T, rows, cols]."""
    tasks, rows, cols = d.shape
    grid = (tasks, triton.cdiv(cols, 128))
    _column_sum_kernel[grid](d, out, out_off, cols if out_ts is None else out_ts, rows, cols, BLOCK_SIZE=128)


def task_linear(x, weight, bias, activation):
    tasks, samples, fan_in, fan_out = check_task_linear_args("task_linear", x, weight, bias, activation)
    x, weight = x.contiguous(), weight.contiguous()
    out = torch.empty((tasks, samples, fan_out), dtype=x.dtype, device=x.device)
    # out [N, out] = x [N, in] @ W^T: B(k = i, j = o) = W[o, i]
    gemm(
        tasks, samples, fan_out, fan_in,
        x, (samples * fan_in, fan_in, 1), weight, (fan_out * fan_in, 1, fan_in), out, (samples * fan_out, fan_out),
        init=INIT_COLUMN_BIAS if bias is not None else INIT_ZERO,
        bias=bias.contiguous() if bias is not None else None, bias_ts=fan_out, activation=activation,
    )
    return out


def task_linear_backward(grad_out, x, weight, out, activation, output_mask):
    tasks, samples, fan_in, fan_out = check_task_linear_backward_args(grad_out, x, weight, out, activation)
    grad_out, x, weight, out = grad_out.contiguous(), x.contiguous(), weight.contiguous(), out.contiguous()
    dz = activation_grad(grad_out, out, activation)
    d_x = d_w = d_b = None
    if output_mask[0]:  # d_x [N, in] = dz [N, out] @ W [out, in]
        d_x = torch.empty_like(x)
        gemm(tasks, samples, fan_in, fan_out, dz, (samples * fan_out, fan_out, 1), weight,
             (fan_out * fan_in, fan_in, 1), d_x, (samples * fan_in, fan_in))
    if output_mask[1]:  # d_W [out, in] = dz^T [out, N] @ x [N, in]
        d_w = torch.empty_like(weight)
        gemm(tasks, fan_out, fan_in, samples, dz, (samples * fan_out, 1, fan_out), x, (samples * fan_in, fan_in, 1),
             d_w, (fan_out * fan_in, fan_in))
    if output_mask[2]:
        d_b = torch.empty((tasks, fan_out), dtype=x.dtype, device=x.device)
        column_sums(dz, d_b)
    return tuple(t if t is not None else x.new_empty(0) for t in (d_x, d_w, d_b))
