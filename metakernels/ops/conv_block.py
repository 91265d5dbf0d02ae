"""metakernels::conv_block: conv2d + BatchNorm (batch statistics) + ReLU + optional 2x2 max-pool, T tasks at once.

Per task t: z = conv2d(x[t], weight[t], bias[t], stride, padding); y = (z - mean) / sqrt(var + eps) * gamma +
beta with the biased batch statistics of z per channel over (N, H, W); out[t] = max_pool2d(relu(y), 2) (or
relu(y)). Exactly nn.Conv2d -> nn.BatchNorm2d (training, no running stats) -> nn.ReLU -> nn.MaxPool2d(2).

The registered op returns (out, conv_out, mean, invstd), as aten's native_batch_norm returns its saved
statistics: torch.library autograd sees only an op's inputs and outputs, and the backward needs the
conv output (recomputing it costs one more convolution per block, ~30% of a block's backward on the CPU)
and the statistics. conv_out is an empty tensor for convolutions with few taps (Cin * k * k <= 27), whose
backward recomputes it more cheaply than storing it (see reference.conv_block.saves_conv_out). The three
extra outputs are non-differentiable; `conv_block` below returns `out` only.

Autograd: the first backward is the fused op metakernels::conv_block_backward. When the backward itself
must build a graph (create_graph=True: second-order MAML's inner step, Hessian-vector products), it is
instead computed from the reference composition (reference.conv_block.conv_block_reference) by
torch.autograd.grad with create_graph=True, so the op is differentiable to any order.
"""

from __future__ import annotations

import torch

from ..reference.conv_block import conv_block_output_size, conv_block_reference, saves_conv_out
from ._library import LIBRARY

LIBRARY.define(
    "conv_block(Tensor x, Tensor weight, Tensor? bias, Tensor? bn_weight, Tensor? bn_bias, int stride, int padding, "
    "float eps, bool pool) -> (Tensor, Tensor, Tensor, Tensor)"
)
LIBRARY.define(
    "conv_block_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor? bn_weight, Tensor? bn_bias, "
    "Tensor conv_out, Tensor mean, Tensor invstd, int stride, int padding, bool pool, bool[5] output_mask) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor)"
)

_CONV_BLOCK = torch.ops.metakernels.conv_block.default
_CONV_BLOCK_BACKWARD = torch.ops.metakernels.conv_block_backward.default


def conv_block(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    bn_weight: torch.Tensor | None = None,
    bn_bias: torch.Tensor | None = None,
    *,
    stride: int = 1,
    padding: int = 1,
    eps: float = 1e-5,
    pool: bool = True,
) -> torch.Tensor:
    """One conv block of T tasks, each with its own weights: conv -> BatchNorm (batch stats) -> ReLU -> max-pool.

    Args:
        x: [T, N, Cin, H, W] inputs, float32 or float64, any strides. The layout this op returns (channels
            last per image, physical [T, N, H, W, C]) is read without a copy.
        weight: [T, Cout, Cin, k, k] conv weights of each task.
        bias: [T, Cout] conv bias or None. It cancels in the normalisation (its gradient is zero).
        bn_weight, bn_bias: [T, Cout] BatchNorm affine parameters (gamma, beta) or None (1 and 0).
        stride: conv stride (>= 1).
        padding: conv zero padding (>= 0).
        eps: BatchNorm epsilon (> 0).
        pool: apply MaxPool2d(2) (kernel 2, stride 2, floor) after the ReLU.

    Returns:
        [T, N, Cout, H', W'] block output with physical order [T, N, H', W', Cout], differentiable to any
        order in x, weight, bias, bn_weight and bn_bias.
    """
    return _CONV_BLOCK(x, weight, bias, bn_weight, bn_bias, int(stride), int(padding), float(eps), bool(pool))[0]


def _empty_channels_last_per_image(like: torch.Tensor, t: int, n: int, c: int, h: int, w: int) -> torch.Tensor:
    return like.new_empty((t, n, h, w, c)).permute(0, 1, 4, 2, 3)


@torch.library.register_fake("metakernels::conv_block")
def _conv_block_fake(x, weight, bias, bn_weight, bn_bias, stride, padding, eps, pool):
    num_tasks, n, cin, h, w = x.shape
    cout, k = weight.shape[1], weight.shape[3]
    ho, hp = conv_block_output_size(h, k, stride, padding, pool)
    wo, wp = conv_block_output_size(w, k, stride, padding, pool)
    out = _empty_channels_last_per_image(x, num_tasks, n, cout, hp, wp)
    if saves_conv_out(cin, k):
        conv_out = _empty_channels_last_per_image(x, num_tasks, n, cout, ho, wo)
    else:
        conv_out = x.new_empty(0)
    return out, conv_out, x.new_empty((num_tasks, cout)), x.new_empty((num_tasks, cout))


@torch.library.register_fake("metakernels::conv_block_backward")
def _conv_block_backward_fake(
    grad_out, x, weight, bn_weight, bn_bias, conv_out, mean, invstd, stride, padding, pool, output_mask
):
    num_tasks, n, cin, h, w = x.shape
    cout = weight.shape[1]
    d_x = _empty_channels_last_per_image(x, num_tasks, n, cin, h, w) if output_mask[0] else x.new_empty(0)
    d_w = x.new_empty(weight.shape) if output_mask[1] else x.new_empty(0)
    d_b = x.new_empty((num_tasks, cout)) if output_mask[2] else x.new_empty(0)
    d_g = x.new_empty((num_tasks, cout)) if output_mask[3] and bn_weight is not None else x.new_empty(0)
    d_bb = x.new_empty((num_tasks, cout)) if output_mask[4] and bn_bias is not None else x.new_empty(0)
    return d_x, d_w, d_b, d_g, d_bb


# --- autograd -----------------------------------------------------------------------------------------------


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, bn_weight, bn_bias, stride, padding, eps, pool = inputs
    _, conv_out, mean, invstd = output
    ctx.mark_non_differentiable(conv_out, mean, invstd)
    # Unused outputs' gradients stay None: materialised, conv_out's zero gradient alone is a fresh tensor of the
    # conv output's size (30 MB for the Omniglot query batch's second block: ~10 ms of zero-filling).
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, weight, bias, bn_weight, bn_bias, conv_out, mean, invstd)
    ctx.stride, ctx.padding, ctx.eps, ctx.pool = stride, padding, eps, pool


def _backward(ctx, grad_out, _g_conv_out, _g_mean, _g_invstd):
    x, weight, bias, bn_weight, bn_bias, conv_out, mean, invstd = ctx.saved_tensors
    need = ctx.needs_input_grad[:5]
    grads: list[torch.Tensor | None] = [None] * 5
    if grad_out is None:  # only the non-differentiable outputs were used
        pass
    elif torch.is_grad_enabled():
        # create_graph: gradients that are themselves differentiable, from the reference composition.
        inputs = (x, weight, bias, bn_weight, bn_bias)
        wanted = [i for i in range(5) if need[i] and inputs[i] is not None]
        if wanted:
            out = conv_block_reference(x, weight, bias, bn_weight, bn_bias, ctx.stride, ctx.padding, ctx.eps, ctx.pool)
            results = torch.autograd.grad(
                out, [inputs[i] for i in wanted], grad_out, create_graph=True, allow_unused=True
            )
            for i, r in zip(wanted, results, strict=True):
                grads[i] = r if r is not None else torch.zeros_like(inputs[i])
    else:
        mask = [need[0], need[1], need[2] and bias is not None, need[3] and bn_weight is not None,
                need[4] and bn_bias is not None]
        if any(mask):
            outs = _CONV_BLOCK_BACKWARD(
                grad_out, x, weight, bn_weight, bn_bias, conv_out, mean, invstd, ctx.stride, ctx.padding, ctx.pool,
                mask,
            )
            grads = [o if m else None for o, m in zip(outs, mask, strict=True)]
    return (*grads, None, None, None, None)


torch.library.register_autograd("metakernels::conv_block", _backward, setup_context=_setup_context)
