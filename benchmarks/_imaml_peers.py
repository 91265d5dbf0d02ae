"""The peer iMAML meta-steps that benchmarks/bench_imaml.py times against metakernels.iMAML.

One definition for all of them (Rajeswaran et al. 2019, the iMAML paper, with its CG-based meta-gradient):

    inner loop  phi_t = theta, then k steps  phi_t <- phi_t - inner_lr * (grad L_train,t(phi_t) + lam (phi_t - theta)),
                no graph kept;
    meta-grad   (1/T) sum_t x_t, x_t after cg_steps iterations of conjugate gradients from x0 = 0 on
                (I + H_t / lam) x = grad L_test,t(phi_t), H_t the Hessian of L_train,t (without the proximal term)
                at phi_t; a task stops early only when its residual is exactly zero;
    meta-loss   the mean query loss (1/T) sum_t L_test,t(phi_t) (its value; its backward is the meta-gradient).

Implementations (each a builder ``(model, workload, batch) -> meta-step closure``; a step leaves the meta-gradient
in ``model``'s parameters' ``.grad`` and returns the meta-loss value):

  loop      per-task plain autograd: inner SGD by torch.autograd.grad, the per-task gradient graph built once at
            phi_t (create_graph=True), each HVP one torch.autograd.grad of that gradient with grad_outputs=v
            (= the gradient of g . v: reverse-over-reverse), and a textbook CG with Python-float scalars;
  torchopt  TorchOpt's implicit differentiation: torchopt.diff.implicit.custom_root with the optimality condition
            torch.func.grad of L_train + lam/2 ||phi - theta||^2 (zero at the inner problem's minimiser),
            argnums=1 (theta), solve=torchopt.linear_solve.solve_cg(maxiter=cg_steps, rtol=0, atol=0), one
            custom_root solve per task, the query loss / T backpropagated per task. TorchOpt then solves
            (H + lam I)^T u = -dL_test/dphi by CG with vector-Jacobian products of the optimality function
            (reverse-over-reverse through torch.func) and returns u^T d(optimality)/d theta = lam (H + lam I)^-1 g,
            the same vector: CG on (H + lam I) and on (I + H/lam) produce proportional iterates (for lam = 2,
            a power of two, even in floating point up to the order of operations). Its CG computes
            r0 = b - A x0 with one extra matrix-vector product (cg_steps + 1 HVPs per task);
  vmap      torch.func: the inner loop as torch.func.grad steps of a per-task function vmapped over tasks, the
            HVP as jvp(grad(L_train)) (forward-over-reverse) vmapped over tasks, inside a CG written in batched
            torch ops (all tasks in lockstep, no host synchronisation). In torch 2.13 jvp(grad(...)) raises
            "ZeroTensors are immutable" for F.mse_loss (measured: a hand-written ((f - y) ** 2).mean() works,
            so does F.cross_entropy); the benchmark records that error;
  vmap_rr   the same with the HVP as grad(phi -> grad(L_train)(phi) . v) (reverse-over-reverse) vmapped over
            tasks: the torch.func formulation that works for every loss.

BatchNorm: every implementation normalises with per-task batch statistics (training mode). The loop runs the
module as it is (its running statistics are updated as a side effect that does not touch the meta-gradient);
the torch.func implementations (torchopt, vmap, vmap_rr) apply torch.func.replace_all_batch_norm_modules_ to
their private copy first, the documented way to run BatchNorm under torch.func transforms (an in-place update
of a captured buffer inside grad/vmap is an error).

TorchOpt's compiled extension (torchopt._C) does not load with torch 2.13 (an undefined at::empty_like symbol);
it holds only the accelerated Adam op, so nothing here depends on it: custom_root and linear_solve are Python
code over torch.func in every TorchOpt build. See torchopt_extension_status().
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
from _peers import import_peer
from torch import nn
from torch.func import functional_call, grad, jvp, vmap

# TorchOpt 0.7.3's custom_root calls functorch.vjp, which torch 2.13 flags as deprecated on every backward.
warnings.filterwarnings("ignore", message=r".*functorch\.vjp. is deprecated", category=FutureWarning)

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
MetaStep = Callable[[], torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class FlatLayout:
    """A model's parameters as one flat vector [P]: names, shapes and sizes in ``named_parameters`` order.

    Args:
        model: the network; its parameter order defines the layout.
    """

    def __init__(self, model: nn.Module):
        named = list(model.named_parameters())
        self.names = [n for n, _ in named]
        self.shapes = [p.shape for _, p in named]
        self.numels = [p.numel() for _, p in named]

    def flatten(self, tensors: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The tensors (one per parameter, optional leading batch dimensions kept) concatenated on the last dim."""
        lead = tensors[0].shape[: tensors[0].dim() - len(self.shapes[0])]
        return torch.cat([t.reshape(*lead, -1) for t in tensors], dim=-1)

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of a flat [P] vector (no leading dimension; vmap supplies the task dimension) per parameter."""
        parts = flat.split(self.numels, dim=-1)
        return {n: t.view(s) for n, t, s in zip(self.names, parts, self.shapes, strict=True)}

    def set_grads(self, model: nn.Module, flat: torch.Tensor) -> None:
        """Writes a flat meta-gradient [P] into the parameters' .grad (replacing what was there)."""
        for p, g in zip(model.parameters(), flat.split(self.numels), strict=True):
            p.grad = g.view(p.shape).clone()


def _clear_grads(model: nn.Module) -> None:
    for p in model.parameters():
        p.grad = None


def _hyper(w) -> tuple[int, float, float, int, LossFn]:
    return w.inner_steps, w.inner_lr, w.lam, w.cg_steps, w.loss_fn


# --- loop ----------------------------------------------------------------------------------------------------


def build_loop(model: nn.Module, w, batch: Batch, stop_nonpositive: bool = False) -> MetaStep:
    """Per-task plain autograd (see the module docstring).

    ``step.stats`` holds, after each call, the smallest curvature ratio p^T A p / p^T p met by CG over all tasks
    and iterations (A = I + H/lam) and the tasks where it was <= 0. Hessians of ReLU networks are indefinite, and
    such a p exists on the sinusoid workload (some tasks have eigenvalues of H below -lam). With
    stop_nonpositive=True a task's CG stops there and keeps its iterate (the rule of metakernels' batched CG,
    see notes/imaml_api.md); with False (the definition above, the default) CG carries on through it.
    """
    xs, ys, xq, yq = batch
    T = xs.shape[0]
    k, lr, lam, m, loss_fn = _hyper(w)
    layout = FlatLayout(model)
    params = list(model.parameters())

    def loss_at(phi: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return loss_fn(functional_call(model, layout.unflatten(phi), (x,)), y)

    def step() -> torch.Tensor:
        _clear_grads(model)
        theta = layout.flatten([p.detach() for p in params])
        meta_grad = torch.zeros_like(theta)
        total = 0.0
        min_curv = math.inf
        nonpositive: list[int] = []
        for t in range(T):
            phi = theta.clone()
            for _ in range(k):
                phi.requires_grad_(True)
                (g,) = torch.autograd.grad(loss_at(phi, xs[t], ys[t]), phi)
                phi = (phi - lr * (g + lam * (phi - theta))).detach()
            phi.requires_grad_(True)
            query = loss_at(phi, xq[t], yq[t])
            (b,) = torch.autograd.grad(query, phi)
            total += query.item()
            (g_train,) = torch.autograd.grad(loss_at(phi, xs[t], ys[t]), phi, create_graph=True)

            def matvec(v: torch.Tensor, g_train: torch.Tensor = g_train, phi: torch.Tensor = phi) -> torch.Tensor:
                (hv,) = torch.autograd.grad(g_train, phi, grad_outputs=v, retain_graph=True)
                return v + hv / lam

            x = torch.zeros_like(b)
            r = b.clone()
            p = r.clone()
            rs = torch.dot(r, r).item()
            for _ in range(m):
                if rs == 0.0:  # exact solution reached: the only early stop
                    break
                ap = matvec(p)
                pap = torch.dot(p, ap).item()
                min_curv = min(min_curv, pap / torch.dot(p, p).item())
                if pap <= 0.0:
                    if not nonpositive or nonpositive[-1] != t:
                        nonpositive.append(t)
                    if stop_nonpositive:
                        break
                alpha = rs / pap
                x = x + alpha * p
                r = r - alpha * ap
                rs_new = torch.dot(r, r).item()
                p = r + (rs_new / rs) * p
                rs = rs_new
            meta_grad += x.detach()
            del g_train
        layout.set_grads(model, meta_grad / T)
        step.stats = {"min_cg_curvature": min_curv, "tasks_nonpositive_curvature": nonpositive}
        return torch.tensor(total / T, dtype=xs.dtype)

    step.stats = {}
    return step


# --- torch.func ---------------------------------------------------------------------------------------------


def _batched_cg(matvec: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, iterations: int) -> torch.Tensor:
    """CG on all T systems A_t x_t = b_t ([T, P]) in lockstep from x0 = 0, in torch ops (no .item()). A task whose
    residual is exactly zero takes steps of length zero from then on (its iterate is kept)."""
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rs = (r * r).sum(-1)
    for _ in range(iterations):
        ap = matvec(p)
        live = rs > 0
        alpha = torch.where(live, rs / (p * ap).sum(-1), torch.zeros_like(rs))
        x = x + alpha[:, None] * p
        r = r - alpha[:, None] * ap
        rs_new = (r * r).sum(-1)
        beta = torch.where(live, rs_new / rs, torch.zeros_like(rs))
        p = r + beta[:, None] * p
        rs = rs_new
    return x


def _build_vmap(model: nn.Module, w, batch: Batch, hvp_mode: str) -> MetaStep:
    xs, ys, xq, yq = batch
    k, lr, lam, m, loss_fn = _hyper(w)
    torch.func.replace_all_batch_norm_modules_(model)
    layout = FlatLayout(model)
    buffers = dict(model.named_buffers())
    params = list(model.parameters())

    def loss_at(phi: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return loss_fn(functional_call(model, (layout.unflatten(phi), buffers), (x,)), y)

    grad_loss = grad(loss_at)

    def adapt(theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        phi = theta
        for _ in range(k):
            phi = phi - lr * (grad_loss(phi, x, y) + lam * (phi - theta))
        return phi

    if hvp_mode == "jvp":  # forward-over-reverse

        def hvp(phi: torch.Tensor, v: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return jvp(lambda q: grad_loss(q, x, y), (phi,), (v,))[1]

    else:  # reverse-over-reverse

        def hvp(phi: torch.Tensor, v: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return grad(lambda q: torch.dot(grad_loss(q, x, y), v))(phi)

    batched_adapt = vmap(adapt, in_dims=(None, 0, 0))
    batched_grad = vmap(grad_loss)
    batched_loss = vmap(loss_at)
    batched_hvp = vmap(hvp)

    def step() -> torch.Tensor:
        _clear_grads(model)
        theta = layout.flatten([p.detach() for p in params])
        phi = batched_adapt(theta, xs, ys)
        b = batched_grad(phi, xq, yq)
        x = _batched_cg(lambda v: v + batched_hvp(phi, v, xs, ys) / lam, b, m)
        layout.set_grads(model, x.mean(0))
        return batched_loss(phi, xq, yq).mean().detach()

    return step


def build_vmap(model: nn.Module, w, batch: Batch) -> MetaStep:
    """torch.func with the HVP as vmap(jvp(grad)) (forward-over-reverse)."""
    return _build_vmap(model, w, batch, "jvp")


def build_vmap_rr(model: nn.Module, w, batch: Batch) -> MetaStep:
    """torch.func with the HVP as vmap(grad(grad . v)) (reverse-over-reverse)."""
    return _build_vmap(model, w, batch, "rr")


# --- TorchOpt -------------------------------------------------------------------------------------------------


def build_torchopt(model: nn.Module, w, batch: Batch) -> MetaStep:
    """TorchOpt's implicit differentiation, one custom_root solve per task (see the module docstring)."""
    torchopt, why = import_peer("torchopt")
    if torchopt is None:
        raise ImportError(why)
    xs, ys, xq, yq = batch
    T = xs.shape[0]
    k, lr, lam, m, loss_fn = _hyper(w)
    torch.func.replace_all_batch_norm_modules_(model)
    names = [n for n, _ in model.named_parameters()]
    buffers = dict(model.named_buffers())
    params = tuple(model.parameters())

    def forward(phi: tuple[torch.Tensor, ...], x: torch.Tensor) -> torch.Tensor:
        return functional_call(model, (dict(zip(names, phi, strict=True)), buffers), (x,))

    def inner_objective(phi: tuple, theta: tuple, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        prox = sum(((a - b) ** 2).sum() for a, b in zip(phi, theta, strict=True))
        return loss_fn(forward(phi, x), y) + 0.5 * lam * prox

    optimality = torch.func.grad(inner_objective, argnums=0)  # zero at the inner minimiser

    @torchopt.diff.implicit.custom_root(
        optimality, argnums=1, solve=torchopt.linear_solve.solve_cg(maxiter=m, rtol=0.0, atol=0.0)
    )
    def inner_solver(phi: tuple, theta: tuple, x: torch.Tensor, y: torch.Tensor) -> tuple:
        # k SGD steps on the proximal objective; the step is lr times the optimality residual.
        theta = tuple(t.detach() for t in theta)
        phi = tuple(t.detach() for t in phi)
        for _ in range(k):
            g = optimality(phi, theta, x, y)
            phi = tuple(a - lr * b for a, b in zip(phi, g, strict=True))
        return phi

    def step() -> torch.Tensor:
        _clear_grads(model)
        init = tuple(p.detach() for p in params)
        total = torch.zeros((), dtype=xs.dtype)
        for t in range(T):
            phi = inner_solver(init, params, xs[t], ys[t])
            query = loss_fn(forward(phi, xq[t]), yq[t]) / T
            query.backward()
            total += query.detach()
        return total

    return step


def torchopt_extension_status() -> dict[str, object]:
    """Whether TorchOpt's compiled ops load here (they do not with torch 2.13), and why; for the result files."""
    torchopt, why = import_peer("torchopt")
    if torchopt is None:
        return {"imported": False, "error": why}
    out: dict[str, object] = {"imported": True}
    try:
        import torchopt._C  # noqa: F401

        out["compiled_ops"] = "loaded"
    except Exception as exc:
        out["compiled_ops"] = f"not loaded: {type(exc).__name__}: {str(exc)[:160]}"
    out["accelerated_op_available"] = bool(torchopt.accelerated_op.is_available())
    out["note"] = "the compiled ops are the fused Adam only; custom_root and linear_solve are Python in any build"
    return out


def build_loop_stop(model: nn.Module, w, batch: Batch) -> MetaStep:
    """The loop with CG stopping a task on p^T A p <= 0 (the reference for metakernels' contract)."""
    return build_loop(model, w, batch, stop_nonpositive=True)


BUILDERS: dict[str, Callable[[nn.Module, object, Batch], MetaStep]] = {
    "loop": build_loop,
    "torchopt": build_torchopt,
    "vmap": build_vmap,
    "vmap_rr": build_vmap_rr,
}
PEER_OF = {"torchopt": "torchopt"}
