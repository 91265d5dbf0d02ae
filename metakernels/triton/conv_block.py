"""Triton kernels of metakernels::conv_block and conv_block_backward (math: metakernels/reference/conv_block.py).

The convolutions go through torch (cuDNN on CUDA), as one grouped convolution over all tasks; the epilogue
is four Triton kernels over the conv output z stored channels last per image ([T, N, H, W, C], so a block
of channels is contiguous):

  _stats_kernel          per (task, channel block): mean and 1/sqrt(var + eps), two passes over z
                         (mean, then the centred sum of squares: no cancellation)
  _forward_kernel        per (task, output-pixel block, channel block): normalise, affine, ReLU, 2x2 max
  _backward_sums_kernel  per (task, channel block): S1 = sum dy, S2 = sum dy * x_hat over the routed
                         positions (dy: d_out at the first maximum of each window, torch's rule, where it
                         passes the ReLU)
  _backward_dz_kernel    per (task, conv-pixel block, channel block): dz = gamma*invstd*(dy - S1/M - x_hat*S2/M)

Sums accumulate in float32 (float64 for float64 inputs).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..reference.conv_block import (
    channels_last_per_image,
    check_conv_block_args,
    check_conv_block_backward_args,
    from_grouped,
    grouped_conv,
    saves_conv_out,
)

BLOCK_P = 64  # pixels per program


def _block_c(channels: int) -> int:
    return min(64, triton.next_power_of_2(channels))


@triton.jit
def _affine(mean_ptr, invstd_ptr, gamma_ptr, beta_ptr, at, cmask, HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr):
    """(scale, offset) with y = z*scale + offset, as the C++ kernel and torch's batch_norm compute them."""
    mean = tl.load(mean_ptr + at, mask=cmask, other=0.0)
    invstd = tl.load(invstd_ptr + at, mask=cmask, other=0.0)
    if HAS_GAMMA:
        scale = tl.load(gamma_ptr + at, mask=cmask, other=0.0) * invstd
    else:
        scale = invstd
    if HAS_BETA:
        offset = tl.load(beta_ptr + at, mask=cmask, other=0.0) - mean * scale
    else:
        offset = -mean * scale
    return mean, invstd, scale, offset


@triton.jit
def _first_max(y0, y1, y2, y3):
    """Index (0..3, row-major) of the first maximum of a 2x2 window and its value: strict >, NaN wins."""
    m = y0
    idx = tl.zeros(y0.shape, dtype=tl.int32)
    take = (y1 > m) | (y1 != y1)
    m = tl.where(take, y1, m)
    idx = tl.where(take, 1, idx)
    take = (y2 > m) | (y2 != y2)
    m = tl.where(take, y2, m)
    idx = tl.where(take, 2, idx)
    take = (y3 > m) | (y3 != y3)
    m = tl.where(take, y3, m)
    idx = tl.where(take, 3, idx)
    return idx, m


@triton.jit
def _stats_kernel(z_ptr, mean_ptr, invstd_ptr, M, C, eps: tl.float64, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    task = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    base = z_ptr + task * M * C
    probe = tl.load(base + cols, mask=cmask, other=0.0)
    acc_type = tl.float64 if probe.dtype == tl.float64 else tl.float32
    acc = tl.zeros([BLOCK_M, BLOCK_C], dtype=acc_type)
    for m0 in range(0, M, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        mask = (rows[:, None] < M) & cmask[None, :]
        acc += tl.load(base + rows[:, None] * C + cols[None, :], mask=mask, other=0.0).to(acc_type)
    mean = tl.sum(acc, axis=0) / M
    acc = tl.zeros([BLOCK_M, BLOCK_C], dtype=acc_type)
    for m0 in range(0, M, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        mask = (rows[:, None] < M) & cmask[None, :]
        d = tl.load(base + rows[:, None] * C + cols[None, :], mask=mask, other=0.0).to(acc_type) - mean[None, :]
        acc += tl.where(mask, d * d, 0.0)
    var = tl.sum(acc, axis=0) / M
    invstd = 1.0 / tl.sqrt(var + tl.full([], eps, tl.float64).to(acc_type))
    tl.store(mean_ptr + task * C + cols, mean.to(mean_ptr.dtype.element_ty), mask=cmask)
    tl.store(invstd_ptr + task * C + cols, invstd.to(invstd_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def _forward_kernel(
    z_ptr, mean_ptr, invstd_ptr, gamma_ptr, beta_ptr, out_ptr, N, H, W, C, Hp, Wp,
    POOL: tl.constexpr, HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    task = tl.program_id(0)
    pix = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    cols = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    _, _, scale, offset = _affine(mean_ptr, invstd_ptr, gamma_ptr, beta_ptr, task * C + cols, cmask,
                                  HAS_GAMMA, HAS_BETA)
    pmask = pix < N * Hp * Wp
    mask = pmask[:, None] & cmask[None, :]
    z_base = z_ptr + task * N * H * W * C
    if POOL:
        n = pix // (Hp * Wp)
        ph = (pix // Wp) % Hp
        pw = pix % Wp
        p00 = ((n * H + 2 * ph) * W + 2 * pw) * C
        at = p00[:, None] + cols[None, :]
        y0 = tl.load(z_base + at, mask=mask, other=0.0) * scale[None, :] + offset[None, :]
        y1 = tl.load(z_base + at + C, mask=mask, other=0.0) * scale[None, :] + offset[None, :]
        y2 = tl.load(z_base + at + W * C, mask=mask, other=0.0) * scale[None, :] + offset[None, :]
        y3 = tl.load(z_base + at + W * C + C, mask=mask, other=0.0) * scale[None, :] + offset[None, :]
        y = tl.maximum(tl.maximum(y0, y1), tl.maximum(y2, y3))
    else:
        y = tl.load(z_base + pix[:, None] * C + cols[None, :], mask=mask, other=0.0) * scale[None, :] + offset[None, :]
    y = tl.maximum(y, 0.0)
    tl.store(out_ptr + task * N * Hp * Wp * C + pix[:, None] * C + cols[None, :], y, mask=mask)


@triton.jit
def _backward_sums_kernel(
    z_ptr, go_ptr, mean_ptr, invstd_ptr, gamma_ptr, beta_ptr, s1_ptr, s2_ptr, N, H, W, C, Hp, Wp,
    POOL: tl.constexpr, HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    task = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    mean, invstd, scale, offset = _affine(mean_ptr, invstd_ptr, gamma_ptr, beta_ptr, task * C + cols, cmask,
                                          HAS_GAMMA, HAS_BETA)
    acc_type = tl.float64 if mean.dtype == tl.float64 else tl.float32
    acc1 = tl.zeros([BLOCK_P, BLOCK_C], dtype=acc_type)
    acc2 = tl.zeros([BLOCK_P, BLOCK_C], dtype=acc_type)
    z_base = z_ptr + task * N * H * W * C
    go_base = go_ptr + task * N * Hp * Wp * C
    P = N * Hp * Wp
    for p0 in range(0, P, BLOCK_P):
        pix = p0 + tl.arange(0, BLOCK_P)
        mask = (pix < P)[:, None] & cmask[None, :]
        g = tl.load(go_base + pix[:, None] * C + cols[None, :], mask=mask, other=0.0)
        if POOL:
            n = pix // (Hp * Wp)
            ph = (pix // Wp) % Hp
            pw = pix % Wp
            at = (((n * H + 2 * ph) * W + 2 * pw) * C)[:, None] + cols[None, :]
            z0 = tl.load(z_base + at, mask=mask, other=0.0)
            z1 = tl.load(z_base + at + C, mask=mask, other=0.0)
            z2 = tl.load(z_base + at + W * C, mask=mask, other=0.0)
            z3 = tl.load(z_base + at + W * C + C, mask=mask, other=0.0)
            idx, m = _first_max(z0 * scale[None, :] + offset[None, :], z1 * scale[None, :] + offset[None, :],
                                z2 * scale[None, :] + offset[None, :], z3 * scale[None, :] + offset[None, :])
            zarg = tl.where(idx == 0, z0, tl.where(idx == 1, z1, tl.where(idx == 2, z2, z3)))
        else:
            zarg = tl.load(z_base + pix[:, None] * C + cols[None, :], mask=mask, other=0.0)
            m = zarg * scale[None, :] + offset[None, :]
        dy = tl.where(mask & (m > 0), g, 0.0)
        acc1 += dy.to(acc_type)
        acc2 += (dy * ((zarg - mean[None, :]) * invstd[None, :])).to(acc_type)
    tl.store(s1_ptr + task * C + cols, tl.sum(acc1, axis=0).to(s1_ptr.dtype.element_ty), mask=cmask)
    tl.store(s2_ptr + task * C + cols, tl.sum(acc2, axis=0).to(s2_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def _backward_dz_kernel(
    z_ptr, go_ptr, mean_ptr, invstd_ptr, gamma_ptr, beta_ptr, s1_ptr, s2_ptr, dz_ptr, N, H, W, C, Hp, Wp,
    POOL: tl.constexpr, HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    task = tl.program_id(0)
    pix = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    cols = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    at_c = task * C + cols
    mean, invstd, scale, offset = _affine(mean_ptr, invstd_ptr, gamma_ptr, beta_ptr, at_c, cmask, HAS_GAMMA, HAS_BETA)
    M = N * H * W
    k1 = scale  # gamma * invstd
    s1 = tl.load(s1_ptr + at_c, mask=cmask, other=0.0)
    s2 = tl.load(s2_ptr + at_c, mask=cmask, other=0.0)
    pmask = pix < M
    mask = pmask[:, None] & cmask[None, :]
    z_base = z_ptr + task * M * C
    go_base = go_ptr + task * N * Hp * Wp * C
    z = tl.load(z_base + pix[:, None] * C + cols[None, :], mask=mask, other=0.0)
    if POOL:
        n = pix // (H * W)
        h = (pix // W) % H
        w = pix % W
        ph = h // 2
        pw = w // 2
        covered = (ph < Hp) & (pw < Wp) & pmask
        cmask2 = covered[:, None] & cmask[None, :]
        at = (((n * H + 2 * ph) * W + 2 * pw) * C)[:, None] + cols[None, :]
        z0 = tl.load(z_base + at, mask=cmask2, other=0.0)
        z1 = tl.load(z_base + at + C, mask=cmask2, other=0.0)
        z2 = tl.load(z_base + at + W * C, mask=cmask2, other=0.0)
        z3 = tl.load(z_base + at + W * C + C, mask=cmask2, other=0.0)
        idx, m = _first_max(z0 * scale[None, :] + offset[None, :], z1 * scale[None, :] + offset[None, :],
                            z2 * scale[None, :] + offset[None, :], z3 * scale[None, :] + offset[None, :])
        own = ((h % 2) * 2 + (w % 2)).to(tl.int32)
        g = tl.load(go_base + (((n * Hp + ph) * Wp + pw) * C)[:, None] + cols[None, :], mask=cmask2, other=0.0)
        dy = tl.where(cmask2 & (idx == own[:, None]) & (m > 0), g, 0.0)
    else:
        g = tl.load(go_base + pix[:, None] * C + cols[None, :], mask=mask, other=0.0)
        dy = tl.where(z * scale[None, :] + offset[None, :] > 0, g, 0.0)
    x_hat = (z - mean[None, :]) * invstd[None, :]
    dz = k1[None, :] * (dy - (s1 / M)[None, :] - x_hat * (s2 / M)[None, :])
    tl.store(dz_ptr + task * M * C + pix[:, None] * C + cols[None, :], dz, mask=mask)


def _physical(t: torch.Tensor) -> torch.Tensor:
    """[T, N, C, H, W] -> contiguous [T, N, H, W, C] storage (a view when already so laid out)."""
    return t.permute(0, 1, 3, 4, 2).contiguous()


def _optional(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return like if t is None else t.contiguous()  # `like` as a dummy pointer the kernels never read


def conv_block(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    bn_weight: torch.Tensor | None,
    bn_bias: torch.Tensor | None,
    stride: int,
    padding: int,
    eps: float,
    pool: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The op kernel (see metakernels/ops/conv_block.py): grouped conv through torch, Triton epilogue.

    Returns:
        (out, conv_out or an empty tensor, mean, invstd), in the layouts of reference.conv_block.conv_block.
    """
    ho, wo = check_conv_block_args(x, weight, bias, bn_weight, bn_bias, stride, padding, eps, pool)
    num_tasks, n, cin = x.shape[:3]
    cout, k = weight.shape[1], weight.shape[3]
    hp, wp = (ho // 2, wo // 2) if pool else (ho, wo)
    # The bias cancels in the normalisation: the conv runs without it.
    z = _physical(from_grouped(grouped_conv(x, weight, None, stride, padding), num_tasks))
    mean = x.new_empty((num_tasks, cout))
    invstd = x.new_empty((num_tasks, cout))
    block_c = _block_c(cout)
    m = n * ho * wo
    _stats_kernel[(num_tasks, triton.cdiv(cout, block_c))](
        z, mean, invstd, m, cout, float(eps), BLOCK_M=min(BLOCK_P, triton.next_power_of_2(m)), BLOCK_C=block_c
    )
    out = x.new_empty((num_tasks, n, hp, wp, cout))
    _forward_kernel[(num_tasks, triton.cdiv(n * hp * wp, BLOCK_P), triton.cdiv(cout, block_c))](
        z, mean, invstd, _optional(bn_weight, mean), _optional(bn_bias, mean), out, n, ho, wo, cout, hp, wp,
        POOL=bool(pool), HAS_GAMMA=bn_weight is not None, HAS_BETA=bn_bias is not None, BLOCK_P=BLOCK_P,
        BLOCK_C=block_c,
    )
    conv_out = z.permute(0, 1, 4, 2, 3) if saves_conv_out(cin, k) else x.new_empty(0)
    return out.permute(0, 1, 4, 2, 3), conv_out, mean, invstd


def conv_block_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bn_weight: torch.Tensor | None,
    bn_bias: torch.Tensor | None,
    conv_out: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    stride: int,
    padding: int,
    pool: bool,
    output_mask: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The first backward's kernel: Triton sums and dz kernels, the conv backward through torch.

    Returns:
        (d_x, d_weight, d_bias, d_bn_weight, d_bn_bias), an empty tensor for each masked-out output.
    """
    ho, wo = check_conv_block_backward_args(
        grad_out, x, weight, bn_weight, bn_bias, conv_out, mean, invstd, stride, padding, pool, output_mask
    )
    num_tasks, n, cin = x.shape[:3]
    cout, k = weight.shape[1], weight.shape[3]
    hp, wp = (ho // 2, wo // 2) if pool else (ho, wo)
    want_x, want_w = bool(output_mask[0]), bool(output_mask[1])
    want_g = bool(output_mask[3]) and bn_weight is not None
    want_b = bool(output_mask[4]) and bn_bias is not None

    def empty() -> torch.Tensor:  # one per masked output: the op's outputs must not alias each other
        return x.new_empty(0)

    d_x, d_w = empty(), empty()
    d_bias = x.new_zeros((num_tasks, cout)) if output_mask[2] else empty()  # the bias cancels: exactly zero
    if not (want_x or want_w or want_g or want_b):
        return d_x, d_w, d_bias, empty(), empty()
    if conv_out.numel() == 0:
        z = _physical(from_grouped(grouped_conv(x, weight, None, stride, padding), num_tasks))
    else:
        z = _physical(conv_out)
    go = _physical(grad_out)
    mean, invstd = mean.contiguous(), invstd.contiguous()
    gamma, beta = _optional(bn_weight, mean), _optional(bn_bias, mean)
    s1 = x.new_empty((num_tasks, cout))
    s2 = x.new_empty((num_tasks, cout))
    block_c = _block_c(cout)
    flags = dict(POOL=bool(pool), HAS_GAMMA=bn_weight is not None, HAS_BETA=bn_bias is not None, BLOCK_P=BLOCK_P,
                 BLOCK_C=block_c)
    _backward_sums_kernel[(num_tasks, triton.cdiv(cout, block_c))](
        z, go, mean, invstd, gamma, beta, s1, s2, n, ho, wo, cout, hp, wp, **flags
    )
    if want_x or want_w:
        dz = torch.empty_like(z)
        _backward_dz_kernel[(num_tasks, triton.cdiv(n * ho * wo, BLOCK_P), triton.cdiv(cout, block_c))](
            z, go, mean, invstd, gamma, beta, s1, s2, dz, n, ho, wo, cout, hp, wp, **flags
        )
        dz_grouped = dz.permute(1, 0, 4, 2, 3).reshape(n, num_tasks * cout, ho, wo)
        xg = x.permute(1, 0, 2, 3, 4).reshape(n, num_tasks * cin, *x.shape[3:])
        wg = weight.reshape(num_tasks * cout, cin, k, k)
        gx, gw, _ = torch.ops.aten.convolution_backward(
            dz_grouped, xg, wg, None, [stride] * 2, [padding] * 2, [1, 1], False, [0, 0], num_tasks,
            [want_x, want_w, False],
        )
        if want_x:
            d_x = channels_last_per_image(from_grouped(gx, num_tasks))
        if want_w:
            d_w = gw.reshape(weight.shape).contiguous()
    return d_x, d_w, d_bias, (s2 if want_g else empty()), (s1 if want_b else empty())
