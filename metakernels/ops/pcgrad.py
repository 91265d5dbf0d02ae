"""metakernels::pcgrad: PCGrad's gradient surgery over a [T, P] batch of task gradients, in two passes over G.

PCGrad (Yu et al., "Gradient Surgery for Multi-Task Learning", 2020): each task's gradient g_i is, in a
random order over the other tasks j, projected off every ORIGINAL g_j it conflicts with (g_i . g_j < 0);
the update is the sum (or mean) of the projected gradients. Every projected g_i stays in the span of the
original gradients, g_i' = sum_k W[i, k] g_k, and each test g_i' . g_j = W[i] . K[:, j] needs only the Gram
matrix K = G G^T. So the fused op runs in three stages:

1. Gram: K = G_s G_s^T over the shared columns (one blocked pass over G, symmetric: upper triangle only);
2. coefficients: the T x T recurrence on K alone (W = I; for each i, for j in order_i: d = W[i] . K[:, j];
   if d < 0: W[i, j] -= d / (K[j, j] + eps)), single-threaded, O(T^3) on a tiny matrix;
3. combine: update = r (1^T W) G over the shared columns, a GEMV (second pass over G), with r = 1 (sum) or
   1/T (mean); the task-specific columns receive the plain sum 1^T G.

instead of the classic loop's O(T^2) passes over G. The stages are also ops of their own
(pcgrad_gram, pcgrad_coefficients, pcgrad_combine) so a distributed PCGrad can run stage 1 on each shard of
columns, all-reduce the T x T Gram, and run stages 2 and 3 locally.

Not differentiated through: the update is a gradient-surgery result, not a function anyone backpropagates
through; autograd raises a clear error if asked to (see _not_differentiable).
"""

from __future__ import annotations

from typing import Any

import torch

from ._library import LIBRARY

LIBRARY.define(
    "pcgrad(Tensor grads, Tensor orders, Tensor? shared_mask, bool include_self, str reduction, float eps) "
    "-> (Tensor, Tensor)"
)
# The update written into a caller's [P] buffer (no allocation, no page faults of a fresh P-vector: at
# P = 1e7 a fresh 40 MB output costs more than the combine pass over a T = 4 batch). Returns W.
LIBRARY.define(
    "pcgrad_out(Tensor grads, Tensor orders, Tensor? shared_mask, bool include_self, str reduction, float eps, "
    "Tensor(a!) out) -> Tensor"
)
# The three stages, for a distributed PCGrad (and for inspection). Not in OP_NAMES: their CPU kernel is the
# C++ one when the extension serves the ops, else the plain-torch reference (CompositeExplicitAutograd
# below); their CUDA kernel is the Triton one.
LIBRARY.define("pcgrad_gram(Tensor grads, Tensor? shared_mask) -> Tensor")
LIBRARY.define("pcgrad_coefficients(Tensor gram, Tensor orders, bool include_self, float eps) -> Tensor")
LIBRARY.define("pcgrad_combine(Tensor grads, Tensor weights, Tensor? shared_mask) -> Tensor")

_OPS = torch.ops.metakernels
STAGE_OPS = ("pcgrad_gram", "pcgrad_coefficients", "pcgrad_combine")


def pcgrad(
    grads: torch.Tensor,
    *,
    reduction: str = "sum",
    include_self: bool = False,
    orders: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    eps: float = 0.0,
    return_coefficients: bool = False,
    shared_mask: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    process_group: Any = None,
    sharding: str = "parameters",
    gather: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """PCGrad's combined update of T task gradients, fused: two passes over grads instead of O(T^2).

    Semantics (the paper's Algorithm 1, made exact): for each task i, in the order ``orders[i]`` over the
    tasks j (j = i skipped unless ``include_self``), the partly projected g_i is tested against the ORIGINAL
    g_j, and if g_i . g_j < 0, g_i <- g_i - (g_i . g_j) / (||g_j||^2 + eps) g_j. The update is the sum
    (``reduction="sum"``, the paper) or the mean (``"mean"``, the popular PyTorch wrapper) of the projected
    g_i. A zero-gradient task is valid: it projects nothing (0 is not < 0) and is never projected onto (a
    task whose ||g_j||^2 + eps is 0 is skipped, so 0/0 never occurs). Equal to the classic per-pair loop
    (metakernels.reference.pcgrad) with the same orders, up to rounding.

    Which implementation does what (for cross-checking; see benchmarks/bench_pcgrad.py):
      - the paper and TorchJD's ``PCGrad`` aggregator: j != i, sum. TorchJD draws row i as
        ``torch.randperm(T)`` from the global generator, row by row, exactly as ``generator=None`` does
        here: after the same ``torch.manual_seed``, both use the same orders.
      - LibMTL's ``PCGrad`` weighting: visits j = i too (``include_self=True``), sum, eps = 0, order from
        Python's ``random.shuffle``; it projects only the shared parameters, and the task-specific ones
        (each task's head) keep the plain sum of the task gradients, each head's being its own task's.
      - the popular PyTorch wrapper (Pytorch-PCGrad): ``reduction="mean"`` by default, visits j = i
        (``include_self=True``), and projects all parameters together (``shared_mask=None``). Where some
        task has no gradient at all (a task head) it sums the projected gradients instead of averaging
        them: with task heads its update equals ours (shared_mask=None, mean) on the shared parameters only.

    Args:
        grads: [T, P] floating tensor, one flattened gradient per task (float32/float64; bf16/half are
            computed in float32: a float32 copy on the CPU). Any strides; a unit column stride avoids a copy.
        reduction: "sum" (default, the paper) or "mean" over the tasks (shared columns only).
        include_self: also visit j = i (LibMTL and the PyTorch wrapper do; the paper does not).
        orders: optional [T, T] integer tensor; row i is the order in which task i visits the tasks. Each row
            must be a permutation of 0..T-1; with include_self=False the entry i is skipped where it appears.
        generator: without ``orders``, row i is ``torch.randperm(T, generator=generator)``, drawn for
            i = 0, ..., T-1 in turn on the CPU (None: torch's global generator). Pass one of orders and
            generator, not both.
        eps: added to ||g_j||^2 in the projection's denominator (>= 0; 0 in the paper and the peers).
        return_coefficients: also return the coefficient matrix W.
        shared_mask: optional [P] bool tensor. Where True, parameters are shared and projected (and only
            these columns enter the dot products and norms, as LibMTL projects only shared parameters);
            where False they are task-specific (task heads) and receive the plain sum of the task
            gradients, whatever the reduction (a head's gradient comes from its own task; the mean would
            shrink it by 1/T). None (default): all parameters are projected together, as the PyTorch
            wrapper does.
        out: optional contiguous [P] buffer of grads' dtype to write the update into. Not differentiable.
        process_group: a torch.distributed process group across whose ranks the task gradients are sharded
            (torch.distributed.group.WORLD for the default group): the call is then
            metakernels.distributed.pcgrad (see there), which returns this rank's shard of the update and
            exchanges only the T x T Gram matrix. None (default): this process holds the whole [T, P] batch.
        sharding: with process_group: "parameters" (grads is this rank's [T, P_rank] columns) or "tasks"
            (grads is this rank's [T_rank, P] tasks; one all_to_all turns it into column shards).
        gather: with process_group: return the whole [P] update on every rank instead of this rank's shard.

    Returns:
        The update [P] in grads' dtype (``out`` when given); with return_coefficients, also W [T, T]
        float64: projected g_i = sum_k W[i, k] g_k over the shared columns, update = r (1^T W) G there
        (r = 1 or 1/T).

    Raises:
        ValueError/TypeError naming the argument: grads not 2-D, T = 0, P = 0, not floating, NaN/inf in
        grads (found on the Gram's diagonal, not by an extra pass over grads), orders of the wrong shape or
        with a row that is not a permutation, both orders and generator, a shared_mask of the wrong
        length/dtype/device, an unknown reduction, eps < 0 or not finite.
        RuntimeError from autograd if the result is differentiated through.
    """
    if process_group is not None:
        if out is not None:
            raise ValueError("metakernels.pcgrad: out= is not supported with process_group (the result is a shard)")
        # Imported here: the op layer stays free of the distributed layer at import time.
        from ..distributed.pcgrad import pcgrad as distributed_pcgrad

        return distributed_pcgrad(
            grads, process_group=process_group, sharding=sharding, reduction=reduction, include_self=include_self,
            orders=orders, generator=generator, eps=eps, shared_mask=shared_mask, gather=gather,
            return_coefficients=return_coefficients,
        )
    if sharding != "parameters" or gather:
        raise ValueError("metakernels.pcgrad: sharding= and gather= need a process_group")
    if not isinstance(grads, torch.Tensor):
        raise TypeError(f"metakernels.pcgrad: grads must be a tensor, got {type(grads).__name__}")
    if grads.dim() != 2:
        raise ValueError(f"metakernels.pcgrad: grads must be a 2-D [T, P] tensor, got shape {list(grads.shape)}")
    orders = _orders(grads, orders, generator)
    if out is not None:
        if torch.is_grad_enabled() and (grads.requires_grad or out.requires_grad):
            raise RuntimeError(
                "metakernels.pcgrad: out= is not differentiable; call it under torch.no_grad() or on detached tensors"
            )
        weights = _OPS.pcgrad_out(grads, orders, shared_mask, bool(include_self), reduction, float(eps), out)
        update = out
    else:
        update, weights = _OPS.pcgrad(grads, orders, shared_mask, bool(include_self), reduction, float(eps))
    return (update, weights) if return_coefficients else update


def _orders(grads: torch.Tensor, orders: torch.Tensor | None, generator: torch.Generator | None) -> torch.Tensor:
    num_tasks = grads.shape[0]
    if orders is None:
        # Row by row from the generator (documented: users reproduce it, and TorchJD draws the same rows).
        rows = [torch.randperm(num_tasks, generator=generator) for _ in range(num_tasks)]
        drawn = torch.stack(rows) if rows else torch.empty(0, 0, dtype=torch.int64)
        return drawn.to(grads.device)
    if generator is not None:
        raise ValueError("metakernels.pcgrad: pass orders or generator, not both (orders fixes every row)")
    if not isinstance(orders, torch.Tensor):
        orders = torch.as_tensor(orders)
    if orders.dtype in (torch.int8, torch.uint8, torch.int16, torch.int32):
        orders = orders.to(torch.int64)
    return orders.to(grads.device)


# --- stages (for a distributed PCGrad: gram on each shard, all-reduce K, coefficients, combine per shard) ---


def pcgrad_gram(grads: torch.Tensor, shared_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Stage 1: the Gram matrix K = G_s G_s^T of the shared columns.

    Float32 input: products and sums in float32 over chains of at most 128 terms per vector lane (C++) or
    per block (Triton), the partial sums added in float64. Grams of disjoint column shards add up to the
    Gram of the whole (a distributed PCGrad all-reduces them). Does not check grads for NaN/inf: the
    coefficients stage checks K's diagonal.

    Args:
        grads: [T, P] floating tensor (a shard of the columns, in a distributed setting).
        shared_mask: optional [P] bool tensor; only its True columns enter K.

    Returns:
        [T, T] float64 symmetric tensor.
    """
    return _OPS.pcgrad_gram(grads, shared_mask)


def pcgrad_coefficients(
    gram: torch.Tensor, orders: torch.Tensor, include_self: bool = False, eps: float = 0.0
) -> torch.Tensor:
    """Stage 2: the coefficient matrix W from the Gram matrix alone (the projection recurrence, in float64).

    Args:
        gram: [T, T] float64 Gram matrix (pcgrad_gram's, summed over shards).
        orders: [T, T] int64; row i is the order in which task i visits the others (see pcgrad).
        include_self: also visit j = i.
        eps: added to K[j, j] in the projection's denominator (>= 0).

    Returns:
        [T, T] float64 W: projected g_i = sum_k W[i, k] g_k.

    Raises:
        ValueError naming ``gram`` if a diagonal entry is NaN/inf, naming ``orders`` if a row is not a
        permutation; TypeError if gram is not float64.
    """
    return _OPS.pcgrad_coefficients(gram, orders, bool(include_self), float(eps))


def pcgrad_combine(grads: torch.Tensor, weights: torch.Tensor, shared_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Stage 3: weights^T G over the shared columns and 1^T G over the task-specific ones, one pass over G.

    Args:
        grads: [T, P] floating tensor (a shard of the columns, in a distributed setting).
        weights: [T] floating tensor r * W.sum(0) (r = 1 for "sum", 1/T for "mean"); used in the working
            precision (float32 for float32 grads).
        shared_mask: optional [P] bool tensor; its False columns get the plain sum of the task gradients.

    Returns:
        [P] tensor in grads' dtype. No NaN/inf check (pcgrad checks the task-specific columns' sums).
    """
    return _OPS.pcgrad_combine(grads, weights, shared_mask)


# --- fake kernels --------------------------------------------------------------------------------------------


@torch.library.register_fake("metakernels::pcgrad")
def _pcgrad_fake(grads, orders, shared_mask, include_self, reduction, eps):
    num_tasks, num_params = grads.shape
    return grads.new_empty((num_params,)), grads.new_empty((num_tasks, num_tasks), dtype=torch.float64)


@torch.library.register_fake("metakernels::pcgrad_out")
def _pcgrad_out_fake(grads, orders, shared_mask, include_self, reduction, eps, out):
    num_tasks = grads.shape[0]
    return grads.new_empty((num_tasks, num_tasks), dtype=torch.float64)


@torch.library.register_fake("metakernels::pcgrad_gram")
def _pcgrad_gram_fake(grads, shared_mask):
    num_tasks = grads.shape[0]
    return grads.new_empty((num_tasks, num_tasks), dtype=torch.float64)


@torch.library.register_fake("metakernels::pcgrad_coefficients")
def _pcgrad_coefficients_fake(gram, orders, include_self, eps):
    return gram.new_empty(gram.shape, dtype=torch.float64)


@torch.library.register_fake("metakernels::pcgrad_combine")
def _pcgrad_combine_fake(grads, weights, shared_mask):
    return grads.new_empty((grads.shape[1],))


# --- autograd: none, loudly ----------------------------------------------------------------------------------


def _not_differentiable(op: str):
    def backward(ctx, *grad_outputs):
        raise RuntimeError(
            f"metakernels.{op} is not differentiable: PCGrad's projection decisions (g_i . g_j < 0) are "
            "piecewise and its result is used as a gradient, not backpropagated through. Pass detached "
            "gradients (e.g. torch.autograd.grad without create_graph) or detach the result."
        )

    return backward


def _setup_nothing(ctx, inputs, output) -> None:
    pass


for _op in ("pcgrad", *STAGE_OPS):
    torch.library.register_autograd(f"metakernels::{_op}", _not_differentiable(_op), setup_context=_setup_nothing)


# --- stage kernels that metakernels/_backend.py does not register (they are not in OP_NAMES) ------------------


def _register_stage_kernels() -> None:
    """The plain-torch stages serve every device that has no kernel of its own (CompositeExplicitAutograd:
    the CPU when the C++ extension is not serving, whose CPU kernels then take precedence); CUDA tensors
    get the Triton stages, imported on first use."""
    from ..reference import pcgrad as reference

    for name in STAGE_OPS:
        LIBRARY.impl(name, getattr(reference, name), "CompositeExplicitAutograd")

    def lazy(name: str):
        def kernel(*args):
            try:
                from ..triton import pcgrad as triton_pcgrad
            except ImportError as exc:
                raise RuntimeError(f"metakernels: CUDA tensors need triton==3.8.0 ({exc})") from exc
            return getattr(triton_pcgrad, name)(*args)

        return kernel

    for name in STAGE_OPS:
        LIBRARY.impl(name, lazy(name), "CUDA")


_register_stage_kernels()
