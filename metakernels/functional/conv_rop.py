"""Hessian-vector products of conv nets by the R-operator: H_t v_t without a double-backward graph.

For models whose fused plan is conv blocks (Conv2d + BatchNorm2d with batch statistics + ReLU [+ MaxPool2d(2)]),
then Flatten, then Linear layers (ReLU / tanh / identity), with F.mse_loss or F.cross_entropy, every parameter
adapted. The forward and the gradient's backward run once (ConvNetHessian(...)), saving what the products need;
each product is then Pearlmutter's R-operator: one forward pass of the directional derivatives R(.) = d(.)[v]
and one backward pass of R(gradient), all T tasks at once as grouped convolutions ([N, T*C, H, W]).

Why: the double-backward graph of a conv + BatchNorm block is dominated by aten's BatchNorm double backward
(~50% of a product on the Omniglot 4-conv net: ~35 full-size multiplications per block, many for terms a
Hessian-vector product does not use) and by convolution double backwards; here a product costs 6 convolutions
per block (2 in the R-forward, 4 in the R-backward: ~2 gradients) and a dozen elementwise passes.

Per block (per task and channel; mean() over the (N, H, W) positions; s = 1/sqrt(var + eps); zh = (z - mu) s):
    R-forward:   Rz = conv(Rx, W) + conv(x, V)            (the conv bias cancels in the normalisation)
                 Rzh = s (Rz - mean(Rz) - zh mean(zh Rz));   Ry = gamma Rzh + V_gamma zh + V_beta
                 Ra = 1[y > 0] Ry;   Rh = Ra at each pooling window's argmax
    R-backward:  R(dy) = 1[y > 0] (R(dh) routed back to the argmax);   R(dzh) = gamma R(dy) + V_gamma dy
                 R(dz) = Rs/s dz + s (R(dzh) - mean(R(dzh)) - Rzh mean(dzh zh) - zh mean(R(dzh) zh + dzh Rzh)),
                 Rs = -s^2 mean(zh Rz)
                 R(dW) = conv_w(Rx, dz) + conv_w(x, R(dz));   R(dx) = convT(R(dz), W) + convT(dz, V)
                 R(dgamma) = sum(R(dy) zh + dy Rzh);   R(dbeta) = sum(R(dy));   R(db) = sum(R(dz))
The linear layers and the losses follow the MLP R-operator of metakernels.reference.mlp_loss_grad.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..reference.task_linear import activation_backward, activation_forward
from .fused_model import ConvStage, FlattenStage, LinearStage, Stage
from .task_params import ParameterLayout

_IGNORE_INDEX = -100


def conv_rop_supported(
    stages: tuple[Stage, ...] | None, layout: ParameterLayout, kind: str | None, x: torch.Tensor, y: torch.Tensor
) -> bool:
    """Whether ConvNetHessian covers this model, parameter layout, loss and data."""
    if not stages or kind is None or x.dim() != 5:
        return False
    convs = [s for s in stages if isinstance(s, ConvStage)]
    if not convs or not isinstance(stages[0], ConvStage):
        return False
    order = [type(s) for s in stages]
    first_other = next((i for i, s in enumerate(stages) if not isinstance(s, ConvStage)), len(stages))
    tail = order[first_other:]
    if not tail or tail[0] is not FlattenStage or any(t is not LinearStage for t in tail[1:]) or len(tail) < 2:
        return False
    names = []
    for s in stages:
        if isinstance(s, ConvStage):
            names += [n for n in (s.weight, s.bias, s.bn_weight, s.bn_bias) if n is not None]
        elif isinstance(s, LinearStage):
            names += [n for n in (s.weight, s.bias) if n is not None]
    if set(names) != set(layout.names) or len(names) != len(layout.names):
        return False  # a shared (not adapted) parameter: the double-backward path serves it
    outputs = layout.specs[layout.segment(stages[-1].weight)].shape[0]
    if kind == "cross_entropy":
        return y.dim() == 2 and y.dtype == torch.int64 and y.shape == x.shape[:2]
    return y.dtype == x.dtype and y.shape == (*x.shape[:2], outputs)


def _csum(t: torch.Tensor) -> torch.Tensor:
    """Per (task, channel) column sum over (N, H, W) of a grouped [N, T*C, H, W] tensor, kept broadcastable."""
    return t.sum((0, 2, 3), keepdim=True)


def _col(t: torch.Tensor | None) -> torch.Tensor | None:
    """[T, C] -> [1, T*C, 1, 1]."""
    return None if t is None else t.reshape(1, -1, 1, 1)


@dataclass
class _ConvSaved:
    """One conv block's forward and gradient. Suffix _p: at the pooling windows' argmax positions only (the
    pooled [N, T*C, Ho/2, Wo/2] grid; the full grid when the block does not pool). After the ReLU and the
    max-pool, only those positions carry gradient, so most of the R-operator's elementwise work runs there:
    4x fewer elements than the conv output, and ~8 full-size passes per product instead of ~33."""

    stage: ConvStage
    x: torch.Tensor  # grouped input [N, T*Cin, H, W]
    weight: torch.Tensor  # grouped [T*Cout, Cin, k, k]
    zh: torch.Tensor  # normalised conv output [N, T*C, Ho, Wo]
    s: torch.Tensor  # 1 / sqrt(var + eps), [1, T*C, 1, 1]
    count: int  # M = N * Ho * Wo, the positions each column's statistics average over
    gamma: torch.Tensor | None  # [1, T*C, 1, 1]
    indices: torch.Tensor | None  # max-pool argmax (flat per plane) or None
    zh_p: torch.Tensor  # zh at the argmax positions
    positive_p: torch.Tensor  # 1[y > 0] there, in the working dtype
    dy_p: torch.Tensor | None = None  # dL/dy there (the backward fills these)
    dzh_p: torch.Tensor | None = None  # dL/dzh there
    dz: torch.Tensor | None = None  # dL/dz, full grid
    mean_dzh: torch.Tensor | None = None  # mean(dzh)
    a_mean: torch.Tensor | None = None  # mean(dzh zh)


@dataclass
class _LinearSaved:
    stage: LinearStage
    h: torch.Tensor  # input [T, N, F]
    weight: torch.Tensor  # [T, out, in]
    a: torch.Tensor  # activation output
    dz: torch.Tensor | None = None
    da: torch.Tensor | None = None


def _gather(indices: torch.Tensor | None, t: torch.Tensor) -> torch.Tensor:
    """t at each pooling window's argmax ([N, C, Ho, Wo] -> [N, C, Ho/2, Wo/2]); t itself without pooling."""
    if indices is None:
        return t
    return t.flatten(2).gather(2, indices.flatten(2)).view(indices.shape)


def _scatter(indices: torch.Tensor | None, t_p: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The transpose of _gather: t_p placed at the argmax positions of a zero tensor shaped like ``like``."""
    if indices is None:
        return t_p.clone()
    out = like.new_zeros(like.shape[0], like.shape[1], like.shape[2] * like.shape[3])
    return out.scatter_(2, indices.flatten(2), t_p.flatten(2)).view(like.shape)


class ConvNetHessian:
    """v [T, P] -> H v [T, P] at fixed (params, x, y), by the R-operator (see the module docstring).

    Args:
        stages: the model's fused plan (conv_rop_supported must hold).
        layout: the [T, P] layout of params (every plan parameter in it).
        flat: [T, P] parameters (read detached); x: [T, N, Cin, H, W]; y: targets; kind: "mse" or "cross_entropy".
    """

    def __init__(
        self,
        stages,
        layout: ParameterLayout,
        flat: torch.Tensor,
        x: torch.Tensor,
        y: torch.Tensor,
        kind: str,
        with_gradient: bool = False,
    ):
        # with_gradient: also keep the per-task losses [T] (self.losses) and gradients [T, P] (self.gradient) of
        # the forward and backward the operator runs anyway (second-order MAML's route reuses them for the
        # inner step at the same point: one support forward and backward fewer).
        self._with_gradient = with_gradient
        self._weight_grads: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            self._build(stages, layout, flat.detach(), x.detach(), y.detach(), kind)

    # --- forward and gradient, once -------------------------------------------------------------------------------
    def _build(self, stages, layout, flat, x, y, kind) -> None:
        self.layout, self.kind, self.num_tasks = layout, kind, flat.shape[0]
        params = layout.views(flat)
        num_tasks, n = x.shape[:2]
        self.n = n
        h = x.permute(1, 0, 2, 3, 4).reshape(n, num_tasks * x.shape[2], *x.shape[3:])
        self.convs: list[_ConvSaved] = []
        self.linears: list[_LinearSaved] = []
        for stage in stages:
            if isinstance(stage, ConvStage):
                w = params[stage.weight]
                wg = w.reshape(-1, *w.shape[2:])
                z = F.conv2d(h, wg, None, stage.stride, stage.padding, 1, num_tasks)  # the bias cancels in BN
                count = z.shape[0] * z.shape[2] * z.shape[3]
                zc = z - _csum(z) / count
                s = torch.rsqrt(_csum(zc.square()) / count + stage.eps)
                zh = zc.mul_(s)
                gamma = _col(params[stage.bn_weight]) if stage.bn_weight else None
                yv = zh if gamma is None else zh * gamma
                if stage.bn_bias is not None:
                    yv = yv + _col(params[stage.bn_bias])
                a = torch.relu(yv)
                indices = None
                if stage.pool:
                    a, indices = F.max_pool2d(a, 2, return_indices=True)
                positive_p = (_gather(indices, yv) > 0).to(zh.dtype)
                self.convs.append(
                    _ConvSaved(stage, h, wg, zh, s, count, gamma, indices, _gather(indices, zh), positive_p)
                )
                h = a
            elif isinstance(stage, FlattenStage):
                self.conv_out_shape = h.shape
                h = h.reshape(n, num_tasks, -1).transpose(0, 1)  # [T, N, C*H*W] in nn.Flatten's order
            else:
                w = params[stage.weight]
                z = torch.bmm(h, w.transpose(1, 2))
                if stage.bias is not None:
                    z = z + params[stage.bias].unsqueeze(1)
                a = activation_forward(z, stage.activation)
                self.linears.append(_LinearSaved(stage, h, w, a))
                h = a
        self.logits = h
        self._targets(y)
        # the gradient's backward, keeping what R(gradient) needs
        d = self._output_grad()
        for saved in reversed(self.linears):
            saved.da = d
            saved.dz = activation_backward(d, saved.a, saved.stage.activation)
            d = torch.bmm(saved.dz, saved.weight)
        d = d.transpose(0, 1).reshape(self.conv_out_shape)
        for i, saved in enumerate(reversed(self.convs)):
            d = self._conv_backward(saved, d, need_dx=i < len(self.convs) - 1)
        if self._with_gradient:
            self._assemble_gradient()

    def _assemble_gradient(self) -> None:
        num_tasks, grads = self.num_tasks, self._weight_grads
        for saved in self.linears:
            st = saved.stage
            grads[st.weight] = torch.bmm(saved.dz.transpose(1, 2), saved.h)
            if st.bias is not None:
                grads[st.bias] = saved.dz.sum(1)
        for saved in self.convs:
            st = saved.stage
            if st.bn_weight is not None:
                grads[st.bn_weight] = (saved.dy_p * saved.zh_p).sum((0, 2, 3)).view(num_tasks, -1)
            if st.bn_bias is not None:
                grads[st.bn_bias] = saved.dy_p.sum((0, 2, 3)).view(num_tasks, -1)
            if st.bias is not None:  # cancels in the normalisation
                grads[st.bias] = saved.zh.new_zeros(num_tasks, saved.zh.shape[1] // num_tasks)
        self.gradient = torch.cat([grads[s.name].reshape(num_tasks, -1) for s in self.layout.specs], 1)
        self._weight_grads = {}
        if self.kind == "cross_entropy":
            nll = -(torch.log_softmax(self.logits, 2) * self.onehot).sum(2)  # [T, N]
            self.losses = (nll * self.weight.squeeze(2)).sum(1)
        else:
            self.losses = (self.logits - self.target).square().mean((1, 2))

    def _targets(self, y: torch.Tensor) -> None:
        if self.kind == "cross_entropy":
            valid = y != _IGNORE_INDEX
            classes = self.logits.shape[2]
            self.onehot = F.one_hot(torch.where(valid, y, 0), classes).to(self.logits.dtype)
            counted = valid.sum(1, keepdim=True).to(self.logits.dtype)
            self.weight = (valid.to(self.logits.dtype) / counted).unsqueeze(2)  # F.cross_entropy's mean
            self.probs = torch.softmax(self.logits, 2)
        else:
            self.target = y
            self.scale = 2.0 / (self.logits.shape[1] * self.logits.shape[2])

    def _output_grad(self) -> torch.Tensor:
        if self.kind == "cross_entropy":
            return (self.probs - self.onehot) * self.weight
        return (self.logits - self.target) * self.scale

    def _output_rgrad(self, r_logits: torch.Tensor) -> torch.Tensor:
        if self.kind == "cross_entropy":
            p = self.probs
            return p * (r_logits - (p * r_logits).sum(2, keepdim=True)) * self.weight
        return r_logits * self.scale

    def _conv_backward(self, saved: _ConvSaved, dh: torch.Tensor, need_dx: bool) -> torch.Tensor | None:
        # dh is dL/d(block output): the pooled grid, i.e. already "at the argmax positions"
        saved.dy_p = dh * saved.positive_p
        saved.dzh_p = saved.dy_p if saved.gamma is None else saved.dy_p * saved.gamma
        saved.mean_dzh = _csum(saved.dzh_p) / saved.count
        saved.a_mean = _csum(saved.dzh_p * saved.zh_p) / saved.count
        # dz = s (dzh - mean(dzh) - zh mean(dzh zh)), dzh = scatter(dzh_p)
        dz = _scatter(saved.indices, saved.dzh_p, saved.zh)
        dz.sub_(saved.mean_dzh).addcmul_(saved.zh, saved.a_mean, value=-1).mul_(saved.s)
        saved.dz = dz
        if self._with_gradient:  # dx and the weight gradient in one call
            dx, dw = self._conv_grads(saved, dz, saved.x, saved.weight, (need_dx, True))
            self._weight_grads[saved.stage.weight] = dw.view(self.num_tasks, -1)
            return dx
        if not need_dx:
            return None
        return self._conv_grads(saved, dz, saved.x, saved.weight, (True, False))[0]

    # --- helpers ------------------------------------------------------------------------------------------------------
    def _conv(self, saved: _ConvSaved, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        st = saved.stage
        return F.conv2d(x, w, None, st.stride, st.padding, 1, self.num_tasks)

    def _conv_grads(
        self, saved: _ConvSaved, grad: torch.Tensor, x: torch.Tensor, w: torch.Tensor, mask: tuple[bool, bool]
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(convT(grad, w), conv_w(x, grad)) of the grouped convolution, the ones ``mask`` asks for, in one call."""
        st = saved.stage
        dx, dw, _ = torch.ops.aten.convolution_backward(
            grad,
            x,
            w,
            None,
            [st.stride] * 2,
            [st.padding] * 2,
            [1, 1],
            False,
            [0, 0],
            self.num_tasks,
            [mask[0], mask[1], False],
        )
        return dx, dw

    # --- the product ------------------------------------------------------------------------------------------------
    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self._product(v)

    def _product(self, v: torch.Tensor) -> torch.Tensor:
        num_tasks = self.num_tasks
        vp = self.layout.views(v)
        out: dict[str, torch.Tensor] = {}
        # R-forward through the conv blocks
        rh = None
        r_conv = []
        for saved in self.convs:
            st = saved.stage
            vw = vp[st.weight]
            vwg = vw.reshape(-1, *vw.shape[2:])
            rz = self._conv(saved, saved.x, vwg)
            if rh is not None:
                rz = rz.add_(self._conv(saved, rh, saved.weight))
            s, m = saved.s, saved.count
            mean_rz = _csum(rz) / m
            r = -s * (_csum(saved.zh * rz) / m)  # Rs / s
            rzh_p = (_gather(saved.indices, rz) - mean_rz).mul_(s).addcmul_(saved.zh_p, r)
            ry_p = rzh_p if saved.gamma is None else rzh_p * saved.gamma
            if st.bn_weight is not None:
                ry_p = ry_p + _col(vp[st.bn_weight]) * saved.zh_p
            if st.bn_bias is not None:
                ry_p = ry_p + _col(vp[st.bn_bias])
            r_conv.append((rh, vwg, rz, mean_rz, r, rzh_p))
            rh = ry_p * saved.positive_p
        rh = rh.reshape(self.n, num_tasks, -1).transpose(0, 1)
        # R-forward through the linear layers
        r_lin = []
        for saved in self.linears:
            st = saved.stage
            v_w = vp[st.weight]
            rz = torch.bmm(rh, saved.weight.transpose(1, 2)).baddbmm_(saved.h, v_w.transpose(1, 2))
            if st.bias is not None:
                rz = rz + vp[st.bias].unsqueeze(1)
            r_lin.append((rh, v_w))
            rh = activation_backward(rz, saved.a, st.activation)  # R(a) = act'(z) Rz
        # R-backward through the linear layers
        rd = self._output_rgrad(rh)
        ras = [rh] + [rin for rin, _ in reversed(r_lin[1:])]  # R(a) of each layer's output, last layer first
        for saved, (rin, v_w), ra in zip(reversed(self.linears), reversed(r_lin), ras, strict=True):
            st = saved.stage
            rdz = activation_backward(rd, saved.a, st.activation)
            if st.activation == "tanh":  # + act''(z) Rz da = -2 a (1 - a^2) Rz da = -2 a R(a) da
                rdz = rdz - 2 * saved.a * ra * saved.da
            out[st.weight] = torch.bmm(rdz.transpose(1, 2), saved.h).baddbmm_(saved.dz.transpose(1, 2), rin)
            if st.bias is not None:
                out[st.bias] = rdz.sum(1)
            rd = torch.bmm(rdz, saved.weight).baddbmm_(saved.dz, v_w)
        rd = rd.transpose(0, 1).reshape(self.conv_out_shape)
        # R-backward through the conv blocks
        for i, (saved, (rx, vwg, rz, mean_rz, r, rzh_p)) in enumerate(
            zip(reversed(self.convs), reversed(r_conv), strict=True)
        ):
            st = saved.stage
            first = i == len(self.convs) - 1
            s, m, zh_p = saved.s, saved.count, saved.zh_p
            rdy_p = rd * saved.positive_p
            rdzh_p = rdy_p if saved.gamma is None else rdy_p * saved.gamma
            if st.bn_weight is not None:
                rdzh_p = rdzh_p + _col(vp[st.bn_weight]) * saved.dy_p
                out[st.bn_weight] = (rdy_p * zh_p + saved.dy_p * rzh_p).sum((0, 2, 3)).view(num_tasks, -1)
            if st.bn_bias is not None:
                out[st.bn_bias] = rdy_p.sum((0, 2, 3)).view(num_tasks, -1)
            if st.bias is not None:  # the conv bias cancels in the normalisation: zero gradient, zero Hessian rows
                out[st.bias] = rz.new_zeros(num_tasks, rz.shape[1] // num_tasks)
            # R(dz) = r dz + s (R(dzh) - mean(R(dzh)) - Rzh A - zh B), A = mean(dzh zh),
            # B = mean(R(dzh) zh + dzh Rzh), expanded with dz = s (dzh - mean(dzh) - zh A) and
            # Rzh = s (Rz - mean(Rz)) + zh r into sparse, Rz, zh and per-column constant terms:
            a_mean = saved.a_mean
            b_mean = _csum(rdzh_p * zh_p + saved.dzh_p * rzh_p) / m
            sparse = (rdzh_p + r * saved.dzh_p).mul_(s)
            constant = -r * s * saved.mean_dzh - s * (_csum(rdzh_p) / m) + s * s * a_mean * mean_rz
            rdz = _scatter(saved.indices, sparse, saved.zh)
            rdz.addcmul_(rz, -s * s * a_mean).addcmul_(saved.zh, -2 * r * s * a_mean - s * b_mean).add_(constant)
            rdx, rdw = self._conv_grads(saved, rdz, saved.x, saved.weight, (not first, True))
            if rx is not None:
                rdx2, rdw2 = self._conv_grads(saved, saved.dz, rx, vwg, (not first, True))
                rdw = rdw.add_(rdw2)
                rdx = None if first else rdx.add_(rdx2)
            out[st.weight] = rdw.view(num_tasks, -1)
            rd = rdx
        return torch.cat([out[s.name].reshape(num_tasks, -1) for s in self.layout.specs], 1)
