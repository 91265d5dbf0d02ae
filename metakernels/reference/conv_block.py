"""Reference of metakernels::conv_block: conv2d + BatchNorm (batch statistics) + ReLU + optional 2x2 max-pool,
one set of weights per task.

Per task t, with z = conv2d(x[t], weight[t], bias[t], stride, padding):

    y = (z - mean_c) / sqrt(var_c + eps) * gamma_c + beta_c,    mean/var (biased) over (N, H, W) per channel
    out[t] = max_pool2d(relu(y), 2)    (or relu(y) without pool)

exactly nn.Conv2d -> nn.BatchNorm2d (training mode, no running statistics) -> nn.ReLU -> nn.MaxPool2d(2).

All tasks run as one grouped convolution: x [T, N, Cin, H, W] -> [N, T*Cin, H, W], weight -> [T*Cout, Cin, k, k]
with groups=T, and F.batch_norm(training=True) on [N, T*Cout, H', W'] then normalises each (task, channel)
by its own batch statistics. `conv_block_reference` is that composition, differentiable to any order; the
op kernels below wrap it with the op's outputs (the saved conv output and statistics) and layouts.

Layouts (shared by every backend, so the fake kernel can state them): `out` and the saved `conv_out` are
channels-last per image, physical order [T, N, H, W, C]; a per-task slice is then a channels_last
[N, C, H, W] tensor, the layout oneDNN's convolution reads and writes fastest, and the next block's
input without a copy. d_x has the same layout; d_weight is contiguous.

The conv bias cancels in the batch normalisation (y does not depend on it), so its gradient is exactly
zero: every backend returns zeros for d_bias rather than a sum of rounding errors.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .._validation import check_like, shape_str

# conv_out is saved for the backward only when recomputing the convolution there costs more than storing
# it. A convolution with at most this many multiply-adds per output element (Cin * k * k) is recomputed:
# on the CPU such a layer (the 1-channel or RGB input layer of a few-shot conv net) runs as a direct
# convolution fused with its epilogue, which never materialises the conv output (120 MB for the first
# Omniglot layer at T = 8, N = 75; see csrc/cpu/conv_block.cpp for the measurements).
RECOMPUTE_MAX_TAPS = 27


def saves_conv_out(in_channels: int, kernel_size: int) -> bool:
    """Whether conv_block returns the conv output for its backward (else an empty tensor: recomputed)."""
    return in_channels * kernel_size * kernel_size > RECOMPUTE_MAX_TAPS


OP = "conv_block"


def _check_task_vector(name: str, t: torch.Tensor | None, x: torch.Tensor, cout: int) -> None:
    if t is None:
        return
    check_like(OP, name, t, "x", x)
    if t.shape != (x.shape[0], cout):
        raise ValueError(
            f"metakernels.conv_block: {name} must be [T, Cout] = [{x.shape[0]}, {cout}], got {shape_str(t)}"
        )


def check_conv_block_args(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    bn_weight: torch.Tensor | None,
    bn_bias: torch.Tensor | None,
    stride: int,
    padding: int,
    eps: float,
    pool: bool,
) -> tuple[int, int]:
    """Validates conv_block's arguments (the messages of csrc/cpu/conv_block.cpp); returns the conv output size."""
    if x.dim() != 5:
        raise ValueError(f"metakernels.conv_block: x must be a 5-D [T, N, Cin, H, W] tensor, got shape {shape_str(x)}")
    if x.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"metakernels.conv_block: x must be float32 or float64, got dtype {x.dtype}")
    num_tasks, n, cin, h, w = x.shape
    if num_tasks == 0:
        raise ValueError("metakernels.conv_block: x is an empty task batch (T = 0)")
    if n == 0:
        raise ValueError("metakernels.conv_block: x has no images (N = 0)")
    if cin == 0:
        raise ValueError("metakernels.conv_block: x has no channels (Cin = 0)")
    if weight.dim() != 5:
        raise ValueError(
            f"metakernels.conv_block: weight must be a 5-D [T, Cout, Cin, k, k] tensor, got shape {shape_str(weight)}"
        )
    check_like(OP, "weight", weight, "x", x)
    if weight.shape[0] != num_tasks:
        raise ValueError(f"metakernels.conv_block: weight has {weight.shape[0]} tasks but x has {num_tasks}")
    if weight.shape[2] != cin:
        raise ValueError(
            f"metakernels.conv_block: weight expects Cin = {weight.shape[2]} input channels but x has {cin}"
        )
    cout, k = weight.shape[1], weight.shape[3]
    if weight.shape[4] != k or k == 0:
        raise ValueError(
            f"metakernels.conv_block: weight must have a square, non-empty k x k kernel, got {k} x {weight.shape[4]}"
        )
    if cout == 0:
        raise ValueError("metakernels.conv_block: weight has no output channels (Cout = 0)")
    _check_task_vector("bias", bias, x, cout)
    _check_task_vector("bn_weight", bn_weight, x, cout)
    _check_task_vector("bn_bias", bn_bias, x, cout)
    if stride < 1:
        raise ValueError(f"metakernels.conv_block: stride must be >= 1, got {stride}")
    if padding < 0:
        raise ValueError(f"metakernels.conv_block: padding must be >= 0, got {padding}")
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"metakernels.conv_block: eps must be finite and > 0, got {eps}")
    if h + 2 * padding < k or w + 2 * padding < k:
        raise ValueError(
            f"metakernels.conv_block: x's spatial size {h} x {w} (padding {padding}) is smaller than the "
            f"{k} x {k} kernel"
        )
    ho, _ = conv_block_output_size(h, k, stride, padding, pool)
    wo, _ = conv_block_output_size(w, k, stride, padding, pool)
    if n * ho * wo < 2:
        raise ValueError(
            f"metakernels.conv_block: x gives one conv output value per channel (N * H' * W' = {n} * {ho} * {wo}): "
            "batch-norm variance needs at least two"
        )
    if pool and (ho < 2 or wo < 2):
        raise ValueError(
            f"metakernels.conv_block: pool needs a conv output of at least 2 x 2, got {ho} x {wo} from x of {h} x {w}"
        )
    return ho, wo


def check_conv_block_backward_args(
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
) -> tuple[int, int]:
    """Validates conv_block_backward's arguments (eps is not needed: invstd carries it)."""
    ho, wo = check_conv_block_args(x, weight, None, bn_weight, bn_bias, stride, padding, 1.0, pool)
    num_tasks, n = x.shape[:2]
    cout = weight.shape[1]
    out_shape = (num_tasks, n, cout, ho // 2, wo // 2) if pool else (num_tasks, n, cout, ho, wo)
    op = "conv_block_backward"
    check_like(op, "grad_out", grad_out, "x", x)
    if grad_out.shape != out_shape:
        raise ValueError(
            f"metakernels.conv_block_backward: grad_out must be the block output's shape {list(out_shape)}, "
            f"got {shape_str(grad_out)}"
        )
    check_like(op, "conv_out", conv_out, "x", x)
    if conv_out.numel() != 0 and conv_out.shape != (num_tasks, n, cout, ho, wo):
        raise ValueError(
            f"metakernels.conv_block_backward: conv_out must be empty or [{num_tasks}, {n}, {cout}, {ho}, {wo}], "
            f"got {shape_str(conv_out)}"
        )
    for name, t in (("mean", mean), ("invstd", invstd)):
        check_like(op, name, t, "x", x)
        if t.shape != (num_tasks, cout):
            raise ValueError(
                f"metakernels.conv_block_backward: {name} must be [T, Cout] = [{num_tasks}, {cout}], got {shape_str(t)}"
            )
    if len(output_mask) != 5:
        raise ValueError("metakernels.conv_block_backward: output_mask must have 5 entries")
    return ho, wo


def conv_block_output_size(size: int, kernel_size: int, stride: int, padding: int, pool: bool) -> tuple[int, int]:
    """(conv output size, block output size) along one spatial dimension."""
    conv = (size + 2 * padding - kernel_size) // stride + 1
    return conv, (conv // 2 if pool else conv)


def channels_last_per_image(t: torch.Tensor) -> torch.Tensor:
    """t [T, N, C, H, W] with physical order [T, N, H, W, C] (a no-op when it already has it)."""
    return t.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)


def grouped_conv(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int, padding: int
) -> torch.Tensor:
    """All tasks' convolutions as one grouped conv: [T, N, Cin, H, W] -> [N, T*Cout, H', W'] (differentiable)."""
    num_tasks, n, cin, h, w = x.shape
    cout, k = weight.shape[1], weight.shape[3]
    xg = x.permute(1, 0, 2, 3, 4).reshape(n, num_tasks * cin, h, w)
    wg = weight.reshape(num_tasks * cout, cin, k, k)
    bg = None if bias is None else bias.reshape(-1)
    return F.conv2d(xg, wg, bg, stride, padding, 1, num_tasks)


def from_grouped(z: torch.Tensor, num_tasks: int) -> torch.Tensor:
    """[N, T*C, H, W] -> [T, N, C, H, W] (a view)."""
    n, tc, h, w = z.shape
    return z.reshape(n, num_tasks, tc // num_tasks, h, w).permute(1, 0, 2, 3, 4)


def conv_block_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    bn_weight: torch.Tensor | None,
    bn_bias: torch.Tensor | None,
    stride: int,
    padding: int,
    eps: float,
    pool: bool,
) -> torch.Tensor:
    """The block as a composition of torch ops, differentiable to any order.

    Args: as metakernels.ops.conv_block.

    Returns:
        [T, N, Cout, H', W'] block output (strides as torch produces them, not the op's layout).
    """
    num_tasks = x.shape[0]
    z = grouped_conv(x, weight, bias, stride, padding)
    g = None if bn_weight is None else bn_weight.reshape(-1)
    b = None if bn_bias is None else bn_bias.reshape(-1)
    y = F.relu(F.batch_norm(z, None, None, g, b, training=True, eps=eps))
    if pool:
        y = F.max_pool2d(y, 2)
    return from_grouped(y, num_tasks)


def batch_stats(z: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(task, channel) mean and 1/sqrt(var + eps) of z [T, N, C, H, W] over (N, H, W): [T, C] each."""
    var, mean = torch.var_mean(z, dim=(1, 3, 4), correction=0)
    return mean, torch.rsqrt(var + eps)


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
    """The op kernel: (out, conv_out, mean, invstd).

    out is the block output; conv_out the convolution output without its bias (the bias cancels) or an
    empty tensor when saves_conv_out says the backward recomputes it; mean and invstd the [T, Cout] batch
    statistics of the convolution output, in x's dtype.
    """
    check_conv_block_args(x, weight, bias, bn_weight, bn_bias, stride, padding, eps, pool)
    num_tasks = x.shape[0]
    z = from_grouped(grouped_conv(x, weight, None, stride, padding), num_tasks)
    mean, invstd = batch_stats(z, eps)
    scale = invstd if bn_weight is None else invstd * bn_weight
    shift = -mean * scale if bn_bias is None else bn_bias - mean * scale
    y = torch.relu(z * scale[:, None, :, None, None] + shift[:, None, :, None, None])
    if pool:
        y = from_grouped(F.max_pool2d(y.permute(1, 0, 2, 3, 4).flatten(1, 2), 2), num_tasks)
    conv_out = channels_last_per_image(z) if saves_conv_out(x.shape[2], weight.shape[3]) else x.new_empty(0)
    return channels_last_per_image(y), conv_out, mean.contiguous(), invstd.contiguous()


def routed_output_grad(
    y: torch.Tensor, grad_out: torch.Tensor, pool: bool
) -> torch.Tensor:
    """dL/dy [T, N, C, H', W'] from dL/d out: through max_pool2d (to the first maximum of each window in
    torch's scan order) and ReLU (zero where y <= 0), as torch's own backward kernels route it."""
    num_tasks = y.shape[0]
    r = torch.relu(y)
    if pool:
        rg = r.permute(1, 0, 2, 3, 4).flatten(1, 2)
        _, indices = torch.ops.aten.max_pool2d_with_indices(rg, [2, 2], [2, 2])
        go = grad_out.permute(1, 0, 2, 3, 4).flatten(1, 2)
        dr = torch.ops.aten.max_pool2d_with_indices_backward(go, rg, [2, 2], [2, 2], [0, 0], [1, 1], False, indices)
        dr = from_grouped(dr, num_tasks)
    else:
        dr = grad_out
    return torch.where(y > 0, dr, torch.zeros_like(dr))


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
    """The op kernel of the first backward: (d_x, d_weight, d_bias, d_bn_weight, d_bn_bias), each an empty
    tensor where output_mask is False (or the input is None). Not differentiable itself: the op's autograd
    uses conv_block_reference when the backward must build a graph."""
    check_conv_block_backward_args(
        grad_out, x, weight, bn_weight, bn_bias, conv_out, mean, invstd, stride, padding, pool, output_mask
    )
    num_tasks, n, cin = x.shape[:3]
    cout, k = weight.shape[1], weight.shape[3]
    if conv_out.numel() == 0:
        z = from_grouped(grouped_conv(x, weight, None, stride, padding), num_tasks)
    else:
        z = conv_out
    m = z.shape[1] * z.shape[3] * z.shape[4]
    gamma = torch.ones_like(mean) if bn_weight is None else bn_weight
    beta = torch.zeros_like(mean) if bn_bias is None else bn_bias

    def per_channel(v: torch.Tensor) -> torch.Tensor:
        return v[:, None, :, None, None]

    x_hat = (z - per_channel(mean)) * per_channel(invstd)
    y = x_hat * per_channel(gamma) + per_channel(beta)
    dy = routed_output_grad(y, grad_out, pool)
    sum_dy = dy.sum(dim=(1, 3, 4))
    sum_dy_xhat = (dy * x_hat).sum(dim=(1, 3, 4))
    dz = per_channel(gamma * invstd) * (dy - per_channel(sum_dy / m) - x_hat * per_channel(sum_dy_xhat / m))

    def empty() -> torch.Tensor:
        return x.new_empty(0)

    d_x = d_w = empty()
    if output_mask[0] or output_mask[1]:
        dzg = dz.permute(1, 0, 2, 3, 4).flatten(1, 2)
        xg = x.permute(1, 0, 2, 3, 4).flatten(1, 2)
        wg = weight.reshape(num_tasks * cout, cin, k, k)
        gx, gw, _ = torch.ops.aten.convolution_backward(
            dzg, xg, wg, None, [stride] * 2, [padding] * 2, [1, 1], False, [0, 0], num_tasks,
            [bool(output_mask[0]), bool(output_mask[1]), False],
        )
        if output_mask[0]:
            d_x = channels_last_per_image(from_grouped(gx, num_tasks))
        if output_mask[1]:
            d_w = gw.reshape(weight.shape).contiguous()
    d_b = x.new_zeros(num_tasks, cout) if output_mask[2] else empty()
    d_g = sum_dy_xhat.contiguous() if output_mask[3] and bn_weight is not None else empty()
    d_bb = sum_dy.contiguous() if output_mask[4] and bn_bias is not None else empty()
    return d_x, d_w, d_b, d_g, d_bb
