// CPU kernels and C++ autograd of metakernels::inner_step (see csrc/kernels/inner_step.h for the math).
// Autograd lives in C++ because the learners call this op once per inner step and task batch: a Python
// autograd.Function costs ~20 us per call, the whole fused update of a 1e4-element batch ~2 us.
#include <torch/autograd.h>

#include "../kernels/inner_step.h"
#include "common.h"
#include "registrations.h"

namespace metakernels {
namespace {

constexpr const char* kOp = "inner_step";

struct CheckedLr {
  kernels::LrMode mode;
  at::Tensor offsets;  // contiguous int64 [S + 1] when segmented
};

CheckedLr check_inner_step_args(const at::Tensor& theta, const at::Tensor& grad, const at::Tensor& lr,
                                const std::optional<at::Tensor>& segment_offsets,
                                const std::optional<at::Tensor>& theta0, double prox, double weight_decay) {
  check_task_batch(kOp, "theta", theta);
  check_floating(kOp, "theta", theta);
  TORCH_CHECK_VALUE(grad.sizes() == theta.sizes(), "metakernels.inner_step: grad must have the shape of theta ",
                    shape_str(theta), ", got ", shape_str(grad));
  check_like(kOp, "grad", grad, "theta", theta);
  check_like(kOp, "lr", lr, "theta", theta);
  TORCH_CHECK_VALUE(std::isfinite(prox), "metakernels.inner_step: prox must be finite, got ", prox);
  TORCH_CHECK_VALUE(std::isfinite(weight_decay), "metakernels.inner_step: weight_decay must be finite, got ",
                    weight_decay);
  const int64_t P = theta.size(1);
  CheckedLr out{kernels::LrMode::kScalar, at::Tensor()};
  if (segment_offsets.has_value()) {
    const at::Tensor& off = *segment_offsets;
    TORCH_CHECK_TYPE(off.scalar_type() == at::kLong,
                     "metakernels.inner_step: segment_offsets must be an int64 tensor, got dtype ", off.scalar_type());
    TORCH_CHECK_VALUE(off.dim() == 1, "metakernels.inner_step: segment_offsets must be a 1-D tensor [S + 1], got shape ",
                      shape_str(off));
    TORCH_CHECK_VALUE(off.device() == theta.device(), "metakernels.inner_step: segment_offsets is on ", off.device(),
                      " but theta is on ", theta.device());
    TORCH_CHECK_VALUE(lr.dim() == 1 && off.numel() == lr.numel() + 1,
                      "metakernels.inner_step: with segment_offsets of shape ", shape_str(off),
                      " lr must be a 1-D table of ", off.numel() - 1, " rates, got shape ", shape_str(lr));
    out.offsets = off.contiguous();
    const int64_t* o = out.offsets.data_ptr<int64_t>();
    const int64_t S = lr.numel();
    TORCH_CHECK_VALUE(o[0] == 0 && o[S] == P, "metakernels.inner_step: segment_offsets must start at 0 and end at P = ",
                      P, ", got ", o[0], " and ", o[S]);
    for (int64_t s = 0; s < S; ++s)
      TORCH_CHECK_VALUE(o[s] <= o[s + 1], "metakernels.inner_step: segment_offsets must be non-decreasing, got ",
                        o[s], " before ", o[s + 1]);
    out.mode = kernels::LrMode::kSegmented;
  } else if (lr.dim() == 0) {
    out.mode = kernels::LrMode::kScalar;
  } else {
    TORCH_CHECK_VALUE(lr.dim() == 1 && lr.numel() == P,
                      "metakernels.inner_step: lr must be a scalar, a [P] tensor of per-coordinate rates (P = ", P,
                      "), or an [S] table with segment_offsets; got shape ", shape_str(lr));
    out.mode = kernels::LrMode::kPerCoordinate;
  }
  if (theta0.has_value()) {
    const at::Tensor& t0 = *theta0;
    check_like(kOp, "theta0", t0, "theta", theta);
    TORCH_CHECK_VALUE((t0.dim() == 1 && t0.size(0) == P) || t0.sizes() == theta.sizes(),
                      "metakernels.inner_step: theta0 must be [P] or [T, P] like theta ", shape_str(theta), ", got ",
                      shape_str(t0));
  } else {
    TORCH_CHECK_VALUE(prox == 0.0, "metakernels.inner_step: theta0 is required when prox != 0 (prox = ", prox, ")");
  }
  return out;
}

template <typename T>
kernels::LrSpec<T> lr_spec(const CheckedLr& checked, const at::Tensor& lr) {
  kernels::LrSpec<T> spec;
  spec.mode = checked.mode;
  spec.values = lr.data_ptr<T>();
  if (checked.mode == kernels::LrMode::kSegmented) {
    spec.offsets = checked.offsets.data_ptr<int64_t>();
    spec.num_segments = lr.numel();
  } else {
    spec.num_segments = checked.mode == kernels::LrMode::kScalar ? 1 : lr.numel();
  }
  return spec;
}

}  // namespace

namespace {

// Writes into out_in when given (contiguous, theta's shape and dtype; it may be theta itself: each output
// element depends only on the same element of the inputs), else into a new tensor.
at::Tensor inner_step_into(const at::Tensor& theta_in, const at::Tensor& grad_in, const at::Tensor& lr_in,
                           const std::optional<at::Tensor>& segment_offsets, const std::optional<at::Tensor>& theta0_in,
                           double prox, double weight_decay, const std::optional<at::Tensor>& out_in) {
  const CheckedLr checked =
      check_inner_step_args(theta_in, grad_in, lr_in, segment_offsets, theta0_in, prox, weight_decay);
  if (out_in.has_value()) {
    TORCH_CHECK_VALUE(out_in->sizes() == theta_in.sizes() && out_in->is_contiguous(),
                      "metakernels.inner_step: out must be a contiguous tensor of theta's shape ", shape_str(theta_in),
                      ", got ", shape_str(*out_in), out_in->is_contiguous() ? "" : " (non-contiguous)");
    check_like(kOp, "out", *out_in, "theta", theta_in);
  }
  const at::Tensor theta = theta_in.contiguous();
  const at::Tensor grad = grad_in.contiguous();
  const at::Tensor lr = lr_in.contiguous();
  const at::Tensor theta0 = theta0_in.has_value() ? theta0_in->contiguous() : at::Tensor();
  at::Tensor out = out_in.has_value() ? *out_in : at::empty_like(theta, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, theta.scalar_type(), "inner_step_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    kernels::inner_step_forward<scalar_t, acc_t>(
        theta.data_ptr<scalar_t>(), grad.data_ptr<scalar_t>(),
        theta0.defined() ? theta0.data_ptr<scalar_t>() : nullptr, theta0.defined() && theta0.dim() == 2,
        lr_spec<scalar_t>(checked, lr), acc_t(prox), acc_t(weight_decay), out.data_ptr<scalar_t>(), theta.size(0),
        theta.size(1), torch_threads());
  });
  return out;
}

}  // namespace

at::Tensor inner_step_cpu(const at::Tensor& theta, const at::Tensor& grad, const at::Tensor& lr,
                          const std::optional<at::Tensor>& segment_offsets, const std::optional<at::Tensor>& theta0,
                          double prox, double weight_decay) {
  return inner_step_into(theta, grad, lr, segment_offsets, theta0, prox, weight_decay, std::nullopt);
}

void inner_step_out_cpu(const at::Tensor& theta, const at::Tensor& grad, const at::Tensor& lr,
                        const std::optional<at::Tensor>& segment_offsets, const std::optional<at::Tensor>& theta0,
                        double prox, double weight_decay, at::Tensor out) {
  inner_step_into(theta, grad, lr, segment_offsets, theta0, prox, weight_decay, out);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> inner_step_backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& theta_in, const at::Tensor& grad_in, const at::Tensor& lr_in,
    const std::optional<at::Tensor>& segment_offsets, const std::optional<at::Tensor>& theta0_in, double prox,
    double weight_decay, std::array<bool, 4> output_mask) {
  const CheckedLr checked =
      check_inner_step_args(theta_in, grad_in, lr_in, segment_offsets, theta0_in, prox, weight_decay);
  TORCH_CHECK_VALUE(grad_out_in.sizes() == theta_in.sizes(),
                    "metakernels.inner_step_backward: grad_out must have the shape of theta ", shape_str(theta_in),
                    ", got ", shape_str(grad_out_in));
  check_like("inner_step_backward", "grad_out", grad_out_in, "theta", theta_in);
  TORCH_CHECK_VALUE(output_mask.size() == 4, "metakernels.inner_step_backward: output_mask must have 4 entries");
  const at::Tensor grad_out = grad_out_in.contiguous();
  const at::Tensor theta = theta_in.contiguous();
  const at::Tensor grad = grad_in.contiguous();
  const at::Tensor lr = lr_in.contiguous();
  const at::Tensor theta0 = theta0_in.has_value() ? theta0_in->contiguous() : at::Tensor();
  // Unrequested outputs are empty [0] tensors, as the fake kernel and the reference produce.
  auto maybe = [&](bool wanted, const at::Tensor& like) {
    return wanted ? at::empty(like.sizes(), theta.options()) : at::empty({0}, theta.options());
  };
  at::Tensor d_theta = maybe(output_mask[0], theta);
  at::Tensor d_grad = maybe(output_mask[1], theta);
  at::Tensor d_lr = maybe(output_mask[2], lr);
  at::Tensor d_theta0 = maybe(output_mask[3] && theta0.defined(), theta0.defined() ? theta0 : theta);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, theta.scalar_type(), "inner_step_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    kernels::InnerStepGrads<scalar_t> g;
    g.d_theta = output_mask[0] ? d_theta.data_ptr<scalar_t>() : nullptr;
    g.d_grad = output_mask[1] ? d_grad.data_ptr<scalar_t>() : nullptr;
    g.d_lr = output_mask[2] ? d_lr.data_ptr<scalar_t>() : nullptr;
    g.d_theta0 = d_theta0.numel() > 0 ? d_theta0.data_ptr<scalar_t>() : nullptr;
    kernels::inner_step_backward<scalar_t, acc_t>(
        grad_out.data_ptr<scalar_t>(), theta.data_ptr<scalar_t>(), grad.data_ptr<scalar_t>(),
        theta0.defined() ? theta0.data_ptr<scalar_t>() : nullptr, theta0.defined() && theta0.dim() == 2,
        lr_spec<scalar_t>(checked, lr), acc_t(prox), acc_t(weight_decay), g, theta.size(0), theta.size(1),
        torch_threads());
  });
  return {d_theta, d_grad, d_lr, d_theta0};
}

// ---------------------------------------------------------------------------------------------------
// autograd

namespace {

at::Tensor call_inner_step(const at::Tensor& theta, const at::Tensor& grad, const at::Tensor& lr,
                           const std::optional<at::Tensor>& segment_offsets, const std::optional<at::Tensor>& theta0,
                           double prox, double weight_decay) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("metakernels::inner_step", "")
                       .typed<decltype(inner_step_cpu)>();
  return op.call(theta, grad, lr, segment_offsets, theta0, prox, weight_decay);
}

using BackwardSig = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, double, double, std::array<bool, 4>);

class InnerStepFunction : public torch::autograd::Function<InnerStepFunction> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& theta, const at::Tensor& grad,
                            const at::Tensor& lr, const std::optional<at::Tensor>& segment_offsets,
                            const std::optional<at::Tensor>& theta0, double prox, double weight_decay) {
    at::AutoDispatchBelowADInplaceOrView guard;
    at::Tensor out = call_inner_step(theta, grad, lr, segment_offsets, theta0, prox, weight_decay);
    ctx->save_for_backward({theta, grad, lr, segment_offsets.value_or(at::Tensor()), theta0.value_or(at::Tensor())});
    ctx->saved_data["prox"] = prox;
    ctx->saved_data["weight_decay"] = weight_decay;
    return out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    static auto backward_op = c10::Dispatcher::singleton()
                                  .findSchemaOrThrow("metakernels::inner_step_backward", "")
                                  .typed<BackwardSig>();
    auto saved = ctx->get_saved_variables();
    const at::Tensor& theta = saved[0];
    const at::Tensor& grad = saved[1];
    const at::Tensor& lr = saved[2];
    std::optional<at::Tensor> offsets = saved[3].defined() ? std::optional<at::Tensor>(saved[3]) : std::nullopt;
    std::optional<at::Tensor> theta0 = saved[4].defined() ? std::optional<at::Tensor>(saved[4]) : std::nullopt;
    const double prox = ctx->saved_data["prox"].toDouble();
    const double weight_decay = ctx->saved_data["weight_decay"].toDouble();
    at::Tensor grad_out = grad_outputs[0];
    torch::autograd::variable_list result(7);
    if (!grad_out.defined()) return result;
    // With no contraction d_theta is grad_out itself: skip a pass over [T, P].
    const bool identity_theta = prox + weight_decay == 0.0;
    const bool want_theta = ctx->needs_input_grad(0);
    // needs_input_grad counts only the tensors that were passed: an absent segment_offsets shifts theta0.
    const size_t theta0_edge = offsets.has_value() ? 4 : 3;
    std::array<bool, 4> mask{want_theta && !identity_theta, ctx->needs_input_grad(1), ctx->needs_input_grad(2),
                             theta0.has_value() && ctx->needs_input_grad(theta0_edge)};
    if (mask[0] || mask[1] || mask[2] || mask[3]) {
      auto [d_theta, d_grad, d_lr, d_theta0] =
          backward_op.call(grad_out, theta, grad, lr, offsets, theta0, prox, weight_decay, mask);
      if (mask[0]) result[0] = d_theta;
      if (mask[1]) result[1] = d_grad;
      if (mask[2]) result[2] = d_lr;
      if (mask[3]) result[4] = d_theta0;
    }
    if (want_theta && identity_theta) result[0] = grad_out;
    return result;
  }
};

at::Tensor inner_step_autograd(const at::Tensor& theta, const at::Tensor& grad, const at::Tensor& lr,
                               const std::optional<at::Tensor>& segment_offsets,
                               const std::optional<at::Tensor>& theta0, double prox, double weight_decay) {
  return InnerStepFunction::apply(theta, grad, lr, segment_offsets, theta0, prox, weight_decay);
}

// --- autograd of inner_step_backward: the double backward of inner_step, in differentiable ATen ops ------
// In C++ rather than Python because every call of the backward op passes through its Autograd kernel, also
// when nothing is differentiated (the first backward of every inner step): through a Python one
// (torch.library.register_autograd) each call costs ~10 us more. Measured on the 2-core dev VM, min over 4
// interleaved rounds, T = 4, mask (d_grad, d_lr): raw backward op 14.2 vs 23.9 us at T*P = 8 and 27.6 vs
// 39.8 us at 1e4; k = 5 steps + one backward, per step, 60.7 vs 80.4 us at 1e4. Same math as
// _double_backward in metakernels/ops/inner_step.py, which serves when the extension is absent.

// Shapes are read as SymInts throughout: opcheck traces this under dynamic shapes (aot_dispatch_dynamic).

// [P] int64: the segment of each column (the reference's segment_ids).
at::Tensor segment_ids(const at::Tensor& offsets, const c10::SymInt& num_params) {
  const at::Tensor counts = offsets.slice(0, 1) - offsets.slice(0, 0, -1);
  return at::repeat_interleave_symint(counts, std::optional<c10::SymInt>(num_params));
}

// The rate broadcastable against [T, P] (differentiable in lr).
at::Tensor expand_rate(const at::Tensor& lr, const at::Tensor& offsets, const c10::SymInt& num_params) {
  return offsets.defined() ? lr.index_select(0, segment_ids(offsets, num_params)) : lr;
}

// Sums a [T, P] tensor back to the shape of lr: the adjoint of expand_rate.
at::Tensor reduce_to_rate(const at::Tensor& x, const at::Tensor& lr, const at::Tensor& offsets) {
  if (!offsets.defined()) return lr.dim() == 0 ? x.sum() : x.sum(0);
  return at::zeros_symint(lr.sym_sizes(), x.options()).index_add(0, segment_ids(offsets, x.sym_size(1)), x.sum(0));
}

at::Tensor accumulate(const at::Tensor& sum, const at::Tensor& term) { return sum.defined() ? sum + term : term; }

class InnerStepBackwardFunction : public torch::autograd::Function<InnerStepBackwardFunction> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& grad_out,
                                                const at::Tensor& theta, const at::Tensor& grad, const at::Tensor& lr,
                                                const std::optional<at::Tensor>& segment_offsets,
                                                const std::optional<at::Tensor>& theta0, double prox,
                                                double weight_decay, std::array<bool, 4> output_mask) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("metakernels::inner_step_backward", "")
                         .typed<BackwardSig>();
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [d_theta, d_grad, d_lr, d_theta0] =
        op.call(grad_out, theta, grad, lr, segment_offsets, theta0, prox, weight_decay, output_mask);
    ctx->save_for_backward(
        {grad_out, theta, grad, lr, segment_offsets.value_or(at::Tensor()), theta0.value_or(at::Tensor())});
    ctx->saved_data["prox"] = prox;
    ctx->saved_data["weight_decay"] = weight_decay;
    ctx->saved_data["mask"] = int64_t(output_mask[0]) | int64_t(output_mask[1]) << 1 |
                              int64_t(output_mask[2]) << 2 | int64_t(output_mask[3]) << 3;
    ctx->set_materialize_grads(false);  // an undefined cotangent is a zero one: skip its terms
    return {d_theta, d_grad, d_lr, d_theta0};
  }

  // Cotangents of (d_theta, d_grad, d_lr, d_theta0) -> cotangents of (grad_out, theta, grad, lr, theta0).
  // With c = prox + weight_decay, L the expanded rate, E expand_rate, R reduce_to_rate:
  //   d_theta = go (1 - L c),  d_grad = -L go,  d_lr = -R(go u),  d_theta0 = prox L go,
  //   u = grad + prox (theta - theta0) + weight_decay theta.
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list cot) {
    auto saved = ctx->get_saved_variables();
    const at::Tensor &grad_out = saved[0], &theta = saved[1], &grad = saved[2], &lr = saved[3];
    const at::Tensor &offsets = saved[4], &theta0 = saved[5];
    const double prox = ctx->saved_data["prox"].toDouble();
    const double wd = ctx->saved_data["weight_decay"].toDouble();
    const int64_t mask = ctx->saved_data["mask"].toInt();
    const double c = prox + wd;
    // A masked-off output is an empty [0] tensor: only the requested ones carry cotangents.
    auto used = [&](int i) { return (mask >> i & 1) && cot[i].defined(); };
    const at::Tensor rate = expand_rate(lr, offsets, theta.sym_size(1));
    at::Tensor g_go, g_theta, g_grad, g_rate, g_t0;
    if (used(0)) {
      g_go = accumulate(g_go, cot[0] * (1 - rate * c));
      g_rate = accumulate(g_rate, -c * cot[0] * grad_out);
    }
    if (used(1)) {
      g_go = accumulate(g_go, -rate * cot[1]);
      g_rate = accumulate(g_rate, -cot[1] * grad_out);
    }
    if (used(2)) {
      const at::Tensor e = expand_rate(cot[2], offsets, theta.sym_size(1));
      at::Tensor u = grad + wd * theta;
      if (theta0.defined()) u = u + prox * (theta - theta0);
      g_go = accumulate(g_go, -e * u);
      g_theta = -c * e * grad_out;
      g_grad = -e * grad_out;
      if (theta0.defined()) g_t0 = prox * e * grad_out;
    }
    if (theta0.defined() && used(3)) {
      g_go = accumulate(g_go, prox * rate * cot[3]);  // [P] when theta0 is shared: expanded below
      g_rate = accumulate(g_rate, prox * cot[3] * grad_out);
    }
    torch::autograd::variable_list result(9);
    if (g_go.defined()) result[0] = g_go.dim() == theta.dim() ? g_go : g_go.expand_symint(theta.sym_sizes()).contiguous();
    result[1] = g_theta;
    result[2] = g_grad;
    if (g_rate.defined()) result[3] = reduce_to_rate(g_rate, lr, offsets);
    if (g_t0.defined()) result[5] = theta0.dim() == 1 ? g_t0.sum(0) : g_t0;
    return result;
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> inner_step_backward_autograd(
    const at::Tensor& grad_out, const at::Tensor& theta, const at::Tensor& grad, const at::Tensor& lr,
    const std::optional<at::Tensor>& segment_offsets, const std::optional<at::Tensor>& theta0, double prox,
    double weight_decay, std::array<bool, 4> output_mask) {
  auto outs = InnerStepBackwardFunction::apply(grad_out, theta, grad, lr, segment_offsets, theta0, prox, weight_decay,
                                               output_mask);
  return {outs[0], outs[1], outs[2], outs[3]};
}

}  // namespace

at::Tensor inner_step_dispatch(const at::Tensor& theta, const at::Tensor& grad, const at::Tensor& lr,
                               const std::optional<at::Tensor>& segment_offsets,
                               const std::optional<at::Tensor>& theta0, double prox, double weight_decay) {
  return call_inner_step(theta, grad, lr, segment_offsets, theta0, prox, weight_decay);
}

void register_inner_step_cpu(torch::Library& m) {
  m.impl("inner_step", &inner_step_cpu);
  m.impl("inner_step_backward", &inner_step_backward_cpu);
  m.impl("inner_step_out", &inner_step_out_cpu);
}

void register_inner_step_autograd(torch::Library& m) {
  m.impl("inner_step", &inner_step_autograd);
  m.impl("inner_step_backward", &inner_step_backward_autograd);
}

}  // namespace metakernels
