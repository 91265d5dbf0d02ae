// CPU kernels and C++ autograd of metakernels::mlp_loss_grad (math in csrc/kernels/mlp_loss_grad.h).
//
//   mlp_loss_grad(theta, x, target, widths, activation, loss) -> (loss [T], grad [T, P])
//   mlp_loss_grad_backward(grad_loss?, grad_grad, theta, x, target, ...) -> grad_loss[:, None] * grad + H grad_grad
//
// Autograd (C++, registered to AutogradCPU for the reason given in csrc/cpu/task_linear.cpp): without
// create_graph the backward is the fused Hessian-vector product kernel; with create_graph (a third-order
// derivative, gradgradcheck) it is autograd through the same loss and hand-written backprop composed of
// differentiable ATen ops (mlp_loss_grad_composite below, the C++ twin of metakernels/reference/
// mlp_loss_grad.py), so the op is differentiable to any order. Gradients in x and an mse target come from
// that composition too (they are not on the meta-learning hot path).
#include <torch/autograd.h>

#include "../kernels/mlp_loss_grad.h"
#include "common.h"
#include "layer_common.h"
#include "registrations.h"

namespace metakernels {
namespace {

struct MlpArgs {
  kernels::MlpSpec spec;
  std::vector<int64_t> widths;  // owns spec.widths
  int64_t tasks = 0;
};

std::string widths_str(at::IntArrayRef widths) {
  std::ostringstream s;
  s << widths;
  return s.str();
}

kernels::Loss parse_loss(const char* op, c10::string_view name) {
  if (name == "mse") return kernels::Loss::kMse;
  if (name == "cross_entropy") return kernels::Loss::kCrossEntropy;
  TORCH_CHECK_VALUE(false, "metakernels.", op, ": loss must be 'mse' or 'cross_entropy', got '", std::string(name),
                    "'");
}

// Checks everything but the class indices' range (check_labels, which reads the data).
MlpArgs check_mlp_args(const char* op, const at::Tensor& theta, const at::Tensor& x, const at::Tensor& target,
                       at::IntArrayRef widths, c10::string_view activation, c10::string_view loss) {
  MlpArgs a;
  a.spec.act = parse_activation(op, activation);
  a.spec.loss = parse_loss(op, loss);
  TORCH_CHECK_VALUE(widths.size() >= 2, "metakernels.", op,
                    ": widths must list at least 2 layer widths [in, ..., out], got ", widths_str(widths));
  for (int64_t w : widths)
    TORCH_CHECK_VALUE(w > 0, "metakernels.", op, ": widths must be positive, got ", widths_str(widths));
  a.widths = widths.vec();
  a.spec.widths = a.widths.data();
  a.spec.num_layers = static_cast<int64_t>(widths.size()) - 1;
  check_task_batch(op, "theta", theta);
  check_layer_dtype(op, "theta", theta);
  a.tasks = theta.size(0);
  const int64_t num_params = a.spec.num_params();
  TORCH_CHECK_VALUE(theta.size(1) == num_params, "metakernels.", op, ": theta has P = ", theta.size(1),
                    " columns but widths ", widths_str(widths), " need P = ", num_params,
                    " (each layer's weight [out, in] then its bias [out])");
  TORCH_CHECK_VALUE(x.dim() == 3, "metakernels.", op, ": x must be a 3-D [T, N, in] tensor, got shape ",
                    shape_str(x));
  check_like(op, "x", x, "theta", theta);
  TORCH_CHECK_VALUE(x.size(0) == a.tasks, "metakernels.", op, ": x has ", x.size(0), " tasks but theta has T = ",
                    a.tasks);
  TORCH_CHECK_VALUE(x.size(1) > 0, "metakernels.", op, ": x has no samples (N = 0)");
  TORCH_CHECK_VALUE(x.size(2) == widths[0], "metakernels.", op, ": x has ", x.size(2), " features but widths[0] = ",
                    widths[0]);
  a.spec.samples = x.size(1);
  const int64_t out = widths.back();
  if (a.spec.loss == kernels::Loss::kMse) {
    check_like(op, "target", target, "theta", theta);
    TORCH_CHECK_VALUE(target.sizes() == at::IntArrayRef({a.tasks, a.spec.samples, out}), "metakernels.", op,
                      ": target must be [T, N, w_L] = [", a.tasks, ", ", a.spec.samples, ", ", out,
                      "] for loss='mse', got shape ", shape_str(target));
  } else {
    TORCH_CHECK_TYPE(target.scalar_type() == at::kLong, "metakernels.", op,
                     ": target must be an int64 tensor of class indices for loss='cross_entropy', got dtype ",
                     target.scalar_type());
    TORCH_CHECK_VALUE(target.device() == theta.device(), "metakernels.", op, ": target is on ", target.device(),
                      " but theta is on ", theta.device());
    TORCH_CHECK_VALUE(target.sizes() == at::IntArrayRef({a.tasks, a.spec.samples}), "metakernels.", op,
                      ": target must be [T, N] = [", a.tasks, ", ", a.spec.samples,
                      "] for loss='cross_entropy', got shape ", shape_str(target));
  }
  return a;
}

void check_labels(const char* op, const at::Tensor& labels, int64_t classes) {
  const int64_t* p = labels.data_ptr<int64_t>();
  for (int64_t i = 0, n = labels.numel(); i < n; ++i)
    TORCH_CHECK_VALUE(p[i] >= 0 && p[i] < classes, "metakernels.", op,
                      ": target must hold class indices in [0, w_L) = [0, ", classes, "), got ", p[i]);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> mlp_loss_grad_cpu(const at::Tensor& theta_in, const at::Tensor& x_in,
                                                     const at::Tensor& target_in, at::IntArrayRef widths,
                                                     c10::string_view activation, c10::string_view loss) {
  constexpr const char* op = "mlp_loss_grad";
  const MlpArgs a = check_mlp_args(op, theta_in, x_in, target_in, widths, activation, loss);
  const at::Tensor theta = theta_in.contiguous();
  const at::Tensor x = x_in.contiguous();
  const at::Tensor target = target_in.contiguous();
  const bool ce = a.spec.loss == kernels::Loss::kCrossEntropy;
  if (ce) check_labels(op, target, widths.back());
  at::Tensor loss_out = at::empty({a.tasks}, theta.options());
  at::Tensor grad = at::empty_like(theta, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES(theta.scalar_type(), "mlp_loss_grad_cpu", [&] {
    kernels::mlp_loss_grad<scalar_t>(a.spec, a.tasks, theta.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(),
                                     ce ? nullptr : target.data_ptr<scalar_t>(),
                                     ce ? target.data_ptr<int64_t>() : nullptr, loss_out.data_ptr<scalar_t>(),
                                     grad.data_ptr<scalar_t>(), torch_threads(), BlasGemm{}, VectorTanh{});
  });
  return {loss_out, grad};
}

at::Tensor mlp_loss_grad_backward_cpu(const std::optional<at::Tensor>& grad_loss_in, const at::Tensor& grad_grad_in,
                                      const at::Tensor& theta_in, const at::Tensor& x_in, const at::Tensor& target_in,
                                      at::IntArrayRef widths, c10::string_view activation, c10::string_view loss) {
  constexpr const char* op = "mlp_loss_grad_backward";
  const MlpArgs a = check_mlp_args(op, theta_in, x_in, target_in, widths, activation, loss);
  TORCH_CHECK_VALUE(grad_grad_in.sizes() == theta_in.sizes(), "metakernels.", op,
                    ": grad_grad must have the shape of theta ", shape_str(theta_in), ", got ",
                    shape_str(grad_grad_in));
  check_like(op, "grad_grad", grad_grad_in, "theta", theta_in);
  if (grad_loss_in.has_value()) {
    TORCH_CHECK_VALUE(grad_loss_in->dim() == 1 && grad_loss_in->size(0) == a.tasks, "metakernels.", op,
                      ": grad_loss must be [T] = [", a.tasks, "], got shape ", shape_str(*grad_loss_in));
    check_like(op, "grad_loss", *grad_loss_in, "theta", theta_in);
  }
  const at::Tensor theta = theta_in.contiguous();
  const at::Tensor x = x_in.contiguous();
  const at::Tensor target = target_in.contiguous();
  const at::Tensor v = grad_grad_in.contiguous();
  const at::Tensor g_loss = grad_loss_in.has_value() ? grad_loss_in->contiguous() : at::Tensor();
  const bool ce = a.spec.loss == kernels::Loss::kCrossEntropy;
  if (ce) check_labels(op, target, widths.back());
  at::Tensor result = at::empty_like(theta, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES(theta.scalar_type(), "mlp_loss_grad_backward_cpu", [&] {
    kernels::mlp_hvp<scalar_t>(a.spec, a.tasks, theta.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(),
                               ce ? nullptr : target.data_ptr<scalar_t>(), ce ? target.data_ptr<int64_t>() : nullptr,
                               v.data_ptr<scalar_t>(), g_loss.defined() ? g_loss.data_ptr<scalar_t>() : nullptr,
                               result.data_ptr<scalar_t>(), torch_threads(), BlasGemm{}, VectorTanh{});
  });
  return result;
}

// ---------------------------------------------------------------------------------------------------
// the composition in differentiable ATen ops, and autograd

namespace {

at::Tensor activation_forward(const at::Tensor& z, c10::string_view activation) {
  if (activation == "relu") return at::relu(z);
  if (activation == "tanh") return at::tanh(z);
  return z;
}

at::Tensor activation_backward(const at::Tensor& grad, const at::Tensor& h, c10::string_view activation) {
  if (activation == "relu") return at::threshold_backward(grad, h, 0);
  if (activation == "tanh") return at::tanh_backward(grad, h);
  return grad;
}

// (loss [T], grad [T, P]) by batched matmuls and hand-written backprop; differentiable to any order.
// Shapes other than the widths are read symbolically, as opcheck traces autograd with dynamic shapes.
std::tuple<at::Tensor, at::Tensor> mlp_loss_grad_composite(const at::Tensor& theta, const at::Tensor& x,
                                                           const at::Tensor& target, at::IntArrayRef widths,
                                                           c10::string_view activation, c10::string_view loss) {
  const int64_t L = static_cast<int64_t>(widths.size()) - 1;
  std::vector<at::Tensor> weights, hs{x};
  std::vector<int64_t> offsets;
  at::Tensor z;
  int64_t off = 0;
  for (int64_t l = 0; l < L; ++l) {
    const int64_t in = widths[l], out = widths[l + 1];
    const at::Tensor w = theta.narrow(1, off, out * in).unflatten(1, {out, in});
    const at::Tensor b = theta.narrow(1, off + out * in, out);
    offsets.push_back(off);
    off += out * in + out;
    weights.push_back(w);
    z = at::baddbmm(b.unsqueeze(1), hs.back(), w.transpose(1, 2));
    if (l + 1 < L) hs.push_back(activation_forward(z, activation));
  }
  const c10::SymInt samples = x.sym_size(1);
  at::Tensor loss_value, d;
  if (loss == "mse") {
    const at::Tensor diff = z - target;
    loss_value = diff.square().mean({1, 2});
    d = diff.mul(2.0 / static_cast<double>(widths.back())).div(c10::Scalar(samples));
  } else {
    const at::Tensor logp = at::log_softmax(z, 2);
    loss_value = -logp.gather(2, target.unsqueeze(2)).squeeze(2).mean(1);
    const at::Tensor onehot = at::one_hot(target, widths.back()).to(z.scalar_type());
    d = (logp.exp() - onehot).div(c10::Scalar(samples));
  }
  std::vector<at::Tensor> parts(2 * L);
  for (int64_t l = L - 1; l >= 0; --l) {
    parts[2 * l] = at::bmm(d.transpose(1, 2), hs[l]).flatten(1);
    parts[2 * l + 1] = d.sum(1);
    if (l > 0) d = activation_backward(at::bmm(d, weights[l]), hs[l], activation);
  }
  return {loss_value, at::cat(parts, 1)};
}

// Gradients of <g_loss, loss> + <g_grad, grad> in (theta, x, target) where `want` says so, by autograd through
// the composition. create_graph: on the saved inputs themselves, so the result is differentiable in them and
// in the cotangents; else on detached copies.
std::array<at::Tensor, 3> composite_input_grads(const at::Tensor& theta, const at::Tensor& x,
                                                const at::Tensor& target, at::IntArrayRef widths,
                                                c10::string_view activation, c10::string_view loss,
                                                const at::Tensor& g_loss, const at::Tensor& g_grad,
                                                std::array<bool, 3> want, bool create_graph) {
  at::AutoGradMode enable(true);
  at::Tensor th = theta, xx = x, tg = target;
  if (!create_graph) {
    th = theta.detach().requires_grad_(want[0]);
    xx = x.detach().requires_grad_(want[1]);
    tg = want[2] ? target.detach().requires_grad_(true) : target.detach();
  }
  auto [l, g] = mlp_loss_grad_composite(th, xx, tg, widths, activation, loss);
  torch::autograd::variable_list outputs, cotangents, inputs;
  if (g_loss.defined()) outputs.push_back(l), cotangents.push_back(g_loss);
  if (g_grad.defined()) outputs.push_back(g), cotangents.push_back(g_grad);
  const at::Tensor* candidates[3] = {&th, &xx, &tg};
  for (int i = 0; i < 3; ++i)
    if (want[i]) inputs.push_back(*candidates[i]);
  std::array<at::Tensor, 3> result;
  if (outputs.empty() || inputs.empty()) return result;
  auto grads = torch::autograd::grad(outputs, inputs, cotangents, /*retain_graph=*/create_graph, create_graph,
                                     /*allow_unused=*/true);
  size_t j = 0;
  for (int i = 0; i < 3; ++i)
    if (want[i]) result[i] = grads[j++];
  return result;
}

using ForwardSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                      at::IntArrayRef, c10::string_view, c10::string_view);
using BackwardSig = at::Tensor(const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&,
                               const at::Tensor&, const at::Tensor&, at::IntArrayRef, c10::string_view,
                               c10::string_view);

class MlpLossGradFunction : public torch::autograd::Function<MlpLossGradFunction> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& theta,
                                                const at::Tensor& x, const at::Tensor& target,
                                                at::IntArrayRef widths, c10::string_view activation,
                                                c10::string_view loss) {
    static auto op =
        c10::Dispatcher::singleton().findSchemaOrThrow("metakernels::mlp_loss_grad", "").typed<ForwardSig>();
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [loss_value, grad] = op.call(theta, x, target, widths, activation, loss);
    ctx->save_for_backward({theta, x, target, grad});
    ctx->saved_data["widths"] = widths.vec();
    ctx->saved_data["activation"] = std::string(activation);
    ctx->saved_data["loss"] = std::string(loss);
    ctx->set_materialize_grads(false);  // an unused loss (the usual inner loop) has an undefined cotangent
    return {loss_value, grad};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    static auto backward_op = c10::Dispatcher::singleton()
                                  .findSchemaOrThrow("metakernels::mlp_loss_grad_backward", "")
                                  .typed<BackwardSig>();
    torch::autograd::variable_list result(6);
    const at::Tensor &g_loss = grad_outputs[0], &g_grad = grad_outputs[1];
    if (!g_loss.defined() && !g_grad.defined()) return result;
    auto saved = ctx->get_saved_variables();
    const at::Tensor &theta = saved[0], &x = saved[1], &target = saved[2], &grad = saved[3];
    const std::vector<int64_t> widths = ctx->saved_data["widths"].toIntVector();
    const std::string activation = ctx->saved_data["activation"].toStringRef();
    const std::string loss = ctx->saved_data["loss"].toStringRef();
    const std::array<bool, 3> want{ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                   loss == "mse" && ctx->needs_input_grad(2)};
    if (at::GradMode::is_enabled()) {
      auto g = composite_input_grads(theta, x, target, widths, activation, loss, g_loss, g_grad, want, true);
      for (int i = 0; i < 3; ++i) result[i] = g[i];
      return result;
    }
    if (want[0]) {
      if (g_grad.defined()) {
        // The fused Hessian-vector product, below autograd (no graph is wanted; see task_linear.cpp).
        at::AutoDispatchBelowADInplaceOrView guard;
        result[0] = backward_op.call(g_loss.defined() ? std::optional<at::Tensor>(g_loss) : std::nullopt, g_grad,
                                     theta, x, target, widths, activation, loss);
      } else {
        result[0] = g_loss.unsqueeze(1) * grad;
      }
    }
    if (want[1] || want[2]) {
      auto g = composite_input_grads(theta, x, target, widths, activation, loss, g_loss, g_grad,
                                     {false, want[1], want[2]}, false);
      result[1] = g[1];
      result[2] = g[2];
    }
    return result;
  }
};

}  // namespace

std::tuple<at::Tensor, at::Tensor> mlp_loss_grad_autograd(const at::Tensor& theta, const at::Tensor& x,
                                                          const at::Tensor& target, at::IntArrayRef widths,
                                                          c10::string_view activation, c10::string_view loss) {
  auto outs = MlpLossGradFunction::apply(theta, x, target, widths, activation, loss);
  return {outs[0], outs[1]};
}

void register_mlp_loss_grad_cpu(torch::Library& m) {
  m.impl("mlp_loss_grad", &mlp_loss_grad_cpu);
  m.impl("mlp_loss_grad_backward", &mlp_loss_grad_backward_cpu);
}

}  // namespace metakernels

// See csrc/cpu/task_linear.cpp: AutogradCPU, alive for the life of the process.
TORCH_LIBRARY_IMPL(metakernels, AutogradCPU, m) { m.impl("mlp_loss_grad", &metakernels::mlp_loss_grad_autograd); }
