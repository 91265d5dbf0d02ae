"""Triton kernels of metakernels::mlp_loss_grad and mlp_loss_grad_backward (math: csrc/kernels/mlp_loss_grad.h
and metakernels/reference/mlp_loss_grad.py).

A sequence of launches of the task-batched GEMM of metakernels/triton/task_linear.py (weights read in place
from the flat [T, P] batch through strides, bias and activation in its epilogue, weight gradients written in
place into the [T, P] result), plus small kernels for the loss and its derivatives (one program per task),
the hidden-layer deltas of the R-operator, and the bias-gradient sums. Activations are sample-major
[T, N, w], as the layer inputs come.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..reference.mlp_loss_grad import check_mlp_loss_grad_args, check_mlp_loss_grad_backward_args
from .task_linear import (
    ACT_CODES,
    ELEMENTWISE_BLOCK,
    INIT_ACCUMULATE,
    INIT_COLUMN_BIAS,
    activation_grad,
    column_sums,
    gemm,
)


@triton.jit
def _loss_kernel(
    z_ptr, y_ptr, labels_ptr, rz_ptr, loss_ptr, d_ptr, rd_ptr, samples, classes,
    inv_n_arg: tl.float64, mse_scale_arg: tl.float64, mse_mean_arg: tl.float64,
    CROSS_ENTROPY: tl.constexpr, HVP: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Per task (program): loss, d = dloss/dz and (HVP) rd = loss''(z) rz, over the task's N rows of w_L.

    The constants 1/N, 2/(N w_L) and 1/(N w_L) come in as float64 (an int argument equal to 1 is specialised
    to a constant by Triton, and a plain Python float would be a float32 argument)."""
    task = tl.program_id(0)
    rk = tl.arange(0, BLOCK_K)
    mask = rk < classes
    probe = tl.load(z_ptr)
    acc_type = tl.float64 if probe.dtype == tl.float64 else tl.float32
    total = tl.sum(tl.zeros([BLOCK_K], dtype=acc_type), axis=0)
    inv_n = tl.full([], inv_n_arg, tl.float64).to(acc_type)
    scale = tl.full([], mse_scale_arg, tl.float64).to(acc_type)
    for i in range(samples):
        row = (task * samples + i) * classes
        z = tl.load(z_ptr + row + rk, mask=mask, other=0.0).to(acc_type)
        if CROSS_ENTROPY:
            y = tl.load(labels_ptr + task * samples + i)
            mx = tl.max(tl.where(mask, z, -float("inf")), axis=0)
            e = tl.where(mask, tl.exp(z - mx), 0.0)
            se = tl.sum(e, axis=0)
            p = e / se
            hit = rk == y
            total += mx + tl.log(se) - tl.sum(tl.where(hit, z, 0.0), axis=0)
            d = (p - tl.where(hit, 1.0, 0.0)) * inv_n
            if HVP:
                rz = tl.load(rz_ptr + row + rk, mask=mask, other=0.0).to(acc_type)
                rd = p * (rz - tl.sum(p * rz, axis=0)) * inv_n
        else:
            diff = z - tl.load(y_ptr + row + rk, mask=mask, other=0.0).to(acc_type)
            total += tl.sum(diff * diff, axis=0)
            d = diff * scale
            if HVP:
                rd = tl.load(rz_ptr + row + rk, mask=mask, other=0.0).to(acc_type) * scale
        tl.store(d_ptr + row + rk, d.to(d_ptr.dtype.element_ty), mask=mask)
        if HVP:
            tl.store(rd_ptr + row + rk, rd.to(rd_ptr.dtype.element_ty), mask=mask)
    if CROSS_ENTROPY:
        total = total * inv_n
    else:
        total = total * tl.full([], mse_mean_arg, tl.float64).to(acc_type)
    tl.store(loss_ptr + task, total.to(loss_ptr.dtype.element_ty))


def _output_grads(z, target, rz, loss):
    """(loss [T], d [T, N, w_L], rd or None) by one program per task."""
    tasks, samples, classes = z.shape
    d = torch.empty_like(z)
    rd = torch.empty_like(z) if rz is not None else None
    value = torch.empty(tasks, dtype=z.dtype, device=z.device)
    ce = loss == "cross_entropy"
    _loss_kernel[(tasks,)](
        z, target if not ce else z, target if ce else z, rz if rz is not None else z, value, d,
        rd if rd is not None else d, samples, classes, 1.0 / samples, 2.0 / (samples * classes),
        1.0 / (samples * classes), CROSS_ENTROPY=ce, HVP=rz is not None, BLOCK_K=triton.next_power_of_2(classes),
    )
    return value, d, rd


@triton.jit
def _hidden_delta_kernel(dh_ptr, rdh_ptr, h_ptr, rh_ptr, d_ptr, rd_ptr, numel, ACT: tl.constexpr,
                         BLOCK_SIZE: tl.constexpr):
    """d = dh act'(z); rd = rdh act'(z) + dh act''(z) Rz, with act''(z) Rz = -2 h Rh for tanh (0 otherwise)."""
    offs = tl.program_id(0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < numel
    dh = tl.load(dh_ptr + offs, mask=mask, other=0.0)
    rdh = tl.load(rdh_ptr + offs, mask=mask, other=0.0)
    h = tl.load(h_ptr + offs, mask=mask, other=0.0)
    if ACT == 1:
        on = h > 0
        d = tl.where(on, dh, 0.0)
        rd = tl.where(on, rdh, 0.0)
    elif ACT == 2:
        rh = tl.load(rh_ptr + offs, mask=mask, other=0.0)
        slope = 1.0 - h * h
        d = dh * slope
        rd = rdh * slope - 2.0 * dh * h * rh
    else:
        d = dh
        rd = rdh
    tl.store(d_ptr + offs, d.to(d_ptr.dtype.element_ty), mask=mask)
    tl.store(rd_ptr + offs, rd.to(rd_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _combine_kernel(rd_ptr, d_ptr, g_ptr, e_ptr, per_task, BLOCK_SIZE: tl.constexpr):
    """e[t] = rd[t] + g[t] * d[t] (g one scalar per task)."""
    task = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < per_task
    g = tl.load(g_ptr + task)
    at = task * per_task + offs
    rd = tl.load(rd_ptr + at, mask=mask, other=0.0)
    d = tl.load(d_ptr + at, mask=mask, other=0.0)
    tl.store(e_ptr + at, (rd + g * d).to(e_ptr.dtype.element_ty), mask=mask)


def _layers(widths):
    """(in, out, weight offset, bias offset) per layer."""
    layers, off = [], 0
    for fan_in, fan_out in zip(widths[:-1], widths[1:], strict=True):
        layers.append((fan_in, fan_out, off, off + fan_out * fan_in))
        off += fan_out * fan_in + fan_out
    return layers


def _linear(tasks, samples, h, params, num_params, layer, out=None, init=INIT_COLUMN_BIAS, activation="identity"):
    """out [T, N, out] (+)= act(h @ W^T + b) with W, b read in place from params [T, P] (bias when init says)."""
    fan_in, fan_out, w_off, b_off = layer
    if out is None:
        out = torch.empty((tasks, samples, fan_out), dtype=h.dtype, device=h.device)
    gemm(
        tasks, samples, fan_out, fan_in, h, (samples * fan_in, fan_in, 1), params, (num_params, 1, fan_in),
        out, (samples * fan_out, fan_out), b_off=w_off, init=init, bias=params, bias_off=b_off, bias_ts=num_params,
        activation=activation,
    )
    return out


def _through_weight(tasks, samples, d, params, num_params, layer, out=None, init=0):
    """out [T, N, in] (+)= d [T, N, out] @ W [out, in], W read in place from params."""
    fan_in, fan_out, w_off, _ = layer
    if out is None:
        out = torch.empty((tasks, samples, fan_in), dtype=d.dtype, device=d.device)
    gemm(tasks, samples, fan_in, fan_out, d, (samples * fan_out, fan_out, 1), params, (num_params, fan_in, 1),
         out, (samples * fan_in, fan_in), b_off=w_off, init=init)
    return out


def _weight_grad(tasks, samples, d, h, result, num_params, layer, init=0):
    """result's weight block of the layer (+)= d^T [out, N] @ h [N, in], written in place into [T, P]."""
    fan_in, fan_out, w_off, _ = layer
    gemm(tasks, fan_out, fan_in, samples, d, (samples * fan_out, 1, fan_out), h, (samples * fan_in, fan_in, 1),
         result, (num_params, fan_in), c_off=w_off, init=init)


def _forward(theta, x, layers, activation):
    """[x, h_1, ..., h_{L-1}, z_L]."""
    tasks, samples, _ = x.shape
    num_params = theta.shape[1]
    hs = [x]
    for i, layer in enumerate(layers):
        act = activation if i < len(layers) - 1 else "identity"
        hs.append(_linear(tasks, samples, hs[-1], theta, num_params, layer, activation=act))
    return hs


def mlp_loss_grad(theta, x, target, widths, activation, loss):
    widths = check_mlp_loss_grad_args("mlp_loss_grad", theta, x, target, widths, activation, loss)
    theta, x, target = theta.contiguous(), x.contiguous(), target.contiguous()
    tasks, num_params = theta.shape
    samples = x.shape[1]
    layers = _layers(widths)
    hs = _forward(theta, x, layers, activation)
    value, d, _ = _output_grads(hs[-1], target, None, loss)
    grad = torch.empty_like(theta)
    for i in range(len(layers) - 1, -1, -1):
        layer = layers[i]
        _weight_grad(tasks, samples, d, hs[i], grad, num_params, layer)
        column_sums(d, grad, out_off=layer[3], out_ts=num_params)
        if i > 0:
            d = activation_grad(_through_weight(tasks, samples, d, theta, num_params, layer), hs[i], activation)
    return value, grad


def mlp_loss_grad_backward(grad_loss, grad_grad, theta, x, target, widths, activation, loss):
    widths = check_mlp_loss_grad_backward_args(grad_loss, grad_grad, theta, x, target, widths, activation, loss)
    theta, x, target, v = theta.contiguous(), x.contiguous(), target.contiguous(), grad_grad.contiguous()
    tasks, num_params = theta.shape
    samples = x.shape[1]
    layers = _layers(widths)
    last = len(layers) - 1
    hs = _forward(theta, x, layers, activation)
    # R-forward: Rz_l = h_{l-1} V^T + c (+ Rh_{l-1} W^T); Rh_l = act'(z_l) Rz_l; Rh_0 = 0
    rhs: list[torch.Tensor | None] = [None]
    rz = x
    for i, layer in enumerate(layers):
        rz = _linear(tasks, samples, hs[i], v, num_params, layer)
        if rhs[i] is not None:
            _linear(tasks, samples, rhs[i], theta, num_params, layer, out=rz, init=INIT_ACCUMULATE)
        if i < last:
            rhs.append(activation_grad(rz, hs[i + 1], activation))
    _, d, rd = _output_grads(hs[-1], target, rz, loss)
    result = torch.empty_like(theta)
    g_loss = grad_loss.contiguous() if grad_loss is not None else None
    for i in range(last, -1, -1):
        layer = layers[i]
        if g_loss is not None:
            e = torch.empty_like(rd)
            per_task = rd[0].numel()
            _combine_kernel[(tasks, triton.cdiv(per_task, ELEMENTWISE_BLOCK))](
                rd, d, g_loss, e, per_task, BLOCK_SIZE=ELEMENTWISE_BLOCK
            )
        else:
            e = rd
        _weight_grad(tasks, samples, e, hs[i], result, num_params, layer)
        if rhs[i] is not None:
            _weight_grad(tasks, samples, d, rhs[i], result, num_params, layer, init=INIT_ACCUMULATE)
        column_sums(e, result, out_off=layer[3], out_ts=num_params)
        if i == 0:
            break
        dh = _through_weight(tasks, samples, d, theta, num_params, layer)
        rdh = _through_weight(tasks, samples, rd, theta, num_params, layer)
        _through_weight(tasks, samples, d, v, num_params, layer, out=rdh, init=INIT_ACCUMULATE)
        d, rd = torch.empty_like(dh), torch.empty_like(dh)
        numel = dh.numel()
        _hidden_delta_kernel[(triton.cdiv(numel, ELEMENTWISE_BLOCK),)](
            dh, rdh, hs[i], rhs[i], d, rd, numel, ACT=ACT_CODES[activation], BLOCK_SIZE=ELEMENTWISE_BLOCK
        )
    return result
