// CPU kernels and C++ autograd of metakernels::task_linear (math in csrc/kernels/task_linear.h).
//
// The autograd kernel is C++ for the reason inner_step's is (csrc/cpu/inner_step.cpp): a query forward of
// a 3-layer MLP is three calls, and a Python autograd kernel adds ~20 us to each forward and each
// backward call. It is registered to AutogradCPU when the extension loads (a static registration, like
// any TORCH_LIBRARY_IMPL), so it serves every CPU backend; metakernels/ops/task_linear.py registers the
// Python autograd to the Autograd alias key, which serves CUDA tensors and CPU tensors without the
// extension. A runtime key's kernel takes precedence over the alias key's, so the two never conflict.
#include <torch/autograd.h>

#include "../kernels/task_linear.h"
#include "common.h"
#include "layer_common.h"
#include "registrations.h"

namespace metakernels {
namespace {

struct LinearDims {
  int64_t tasks, samples, in, out;
};

LinearDims check_task_linear_args(const char* op, const at::Tensor& x, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& bias) {
  TORCH_CHECK_VALUE(x.dim() == 3, "metakernels.", op, ": x must be a 3-D [T, N, in] tensor, got shape ",
                    shape_str(x));
  check_layer_dtype(op, "x", x);
  TORCH_CHECK_VALUE(weight.dim() == 3, "metakernels.", op, ": weight must be a 3-D [T, out, in] tensor, got shape ",
                    shape_str(weight));
  check_like(op, "weight", weight, "x", x);
  const LinearDims d{x.size(0), x.size(1), x.size(2), weight.size(1)};
  TORCH_CHECK_VALUE(d.tasks > 0, "metakernels.", op, ": x is an empty task batch (T = 0)");
  TORCH_CHECK_VALUE(d.samples > 0, "metakernels.", op, ": x has no samples (N = 0)");
  TORCH_CHECK_VALUE(weight.size(0) == d.tasks, "metakernels.", op, ": weight has ", weight.size(0),
                    " tasks but x has T = ", d.tasks);
  TORCH_CHECK_VALUE(weight.size(2) == d.in, "metakernels.", op, ": weight [T, out, in] has in = ", weight.size(2),
                    " but x has ", d.in, " features");
  TORCH_CHECK_VALUE(d.in > 0 && d.out > 0, "metakernels.", op, ": weight must have in > 0 and out > 0, got shape ",
                    shape_str(weight));
  if (bias.has_value()) {
    check_like(op, "bias", *bias, "x", x);
    TORCH_CHECK_VALUE(bias->dim() == 2 && bias->size(0) == d.tasks && bias->size(1) == d.out, "metakernels.", op,
                      ": bias must be [T, out] = [", d.tasks, ", ", d.out, "], got shape ", shape_str(*bias));
  }
  return d;
}

}  // namespace

at::Tensor task_linear_cpu(const at::Tensor& x_in, const at::Tensor& weight_in,
                           const std::optional<at::Tensor>& bias_in, c10::string_view activation) {
  const kernels::Activation act = parse_activation("task_linear", activation);
  const LinearDims d = check_task_linear_args("task_linear", x_in, weight_in, bias_in);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor weight = weight_in.contiguous();
  const at::Tensor bias = bias_in.has_value() ? bias_in->contiguous() : at::Tensor();
  at::Tensor out = at::empty({d.tasks, d.samples, d.out}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "task_linear_cpu", [&] {
    kernels::task_linear_forward<scalar_t>(d.tasks, x.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(),
                                           bias.defined() ? bias.data_ptr<scalar_t>() : nullptr,
                                           out.data_ptr<scalar_t>(), d.samples, d.in, d.out, act, torch_threads(),
                                           BlasGemm{}, VectorTanh{});
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> task_linear_backward_cpu(const at::Tensor& grad_out_in,
                                                                        const at::Tensor& x_in,
                                                                        const at::Tensor& weight_in,
                                                                        const at::Tensor& out_in,
                                                                        c10::string_view activation,
                                                                        std::array<bool, 3> output_mask) {
  constexpr const char* op = "task_linear_backward";
  const kernels::Activation act = parse_activation(op, activation);
  const LinearDims d = check_task_linear_args(op, x_in, weight_in, std::nullopt);
  const std::vector<int64_t> out_shape{d.tasks, d.samples, d.out};
  TORCH_CHECK_VALUE(grad_out_in.sizes() == out_shape, "metakernels.", op, ": grad_out must be [T, N, out] = ",
                    c10::IntArrayRef(out_shape), ", got shape ", shape_str(grad_out_in));
  check_like(op, "grad_out", grad_out_in, "x", x_in);
  TORCH_CHECK_VALUE(out_in.sizes() == out_shape, "metakernels.", op, ": out must be [T, N, out] = ",
                    c10::IntArrayRef(out_shape), ", got shape ", shape_str(out_in));
  check_like(op, "out", out_in, "x", x_in);
  const at::Tensor grad_out = grad_out_in.contiguous();
  const at::Tensor x = x_in.contiguous();
  const at::Tensor weight = weight_in.contiguous();
  const at::Tensor out = out_in.contiguous();
  // Unrequested outputs are empty [0] tensors, one each (outputs of one call must not alias).
  auto maybe = [&](bool wanted, at::IntArrayRef shape) {
    return wanted ? at::empty(shape, x.options()) : at::empty({0}, x.options());
  };
  at::Tensor d_x = maybe(output_mask[0], x.sizes());
  at::Tensor d_w = maybe(output_mask[1], weight.sizes());
  at::Tensor d_b = maybe(output_mask[2], {d.tasks, d.out});
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "task_linear_backward_cpu", [&] {
    kernels::task_linear_backward<scalar_t>(
        d.tasks, grad_out.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(),
        out.data_ptr<scalar_t>(), output_mask[0] ? d_x.data_ptr<scalar_t>() : nullptr,
        output_mask[1] ? d_w.data_ptr<scalar_t>() : nullptr, output_mask[2] ? d_b.data_ptr<scalar_t>() : nullptr,
        d.samples, d.in, d.out, act, torch_threads(), BlasGemm{});
  });
  return {d_x, d_w, d_b};
}

// ---------------------------------------------------------------------------------------------------
// autograd

namespace {

using ForwardSig = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                              c10::string_view);
using BackwardSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                   const at::Tensor&, const at::Tensor&,
                                                                   c10::string_view, std::array<bool, 3>);

// grad * act'(z) from the activation's output, in differentiable ATen ops (each has its own derivative, so
// the result is differentiable to any order, in grad and through out).
at::Tensor activation_backward(const at::Tensor& grad, const at::Tensor& out, c10::string_view activation) {
  if (activation == "relu") return at::threshold_backward(grad, out, 0);
  if (activation == "tanh") return at::tanh_backward(grad, out);
  return grad;
}

class TaskLinearFunction : public torch::autograd::Function<TaskLinearFunction> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, c10::string_view activation) {
    static auto op =
        c10::Dispatcher::singleton().findSchemaOrThrow("metakernels::task_linear", "").typed<ForwardSig>();
    at::AutoDispatchBelowADInplaceOrView guard;
    at::Tensor out = op.call(x, weight, bias, activation);
    ctx->save_for_backward({x, weight, out});
    ctx->saved_data["activation"] = std::string(activation);
    ctx->saved_data["has_bias"] = bias.has_value();
    return out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    static auto backward_op = c10::Dispatcher::singleton()
                                  .findSchemaOrThrow("metakernels::task_linear_backward", "")
                                  .typed<BackwardSig>();
    torch::autograd::variable_list result(4);
    const at::Tensor& grad = grad_outputs[0];
    if (!grad.defined()) return result;
    auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1], &out = saved[2];
    const std::string activation = ctx->saved_data["activation"].toStringRef();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    // needs_input_grad counts the tensors passed: bias is the last, so index 2 exists only with a bias.
    const std::array<bool, 3> mask{ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                   has_bias && ctx->needs_input_grad(2)};
    if (!(mask[0] || mask[1] || mask[2])) return result;
    if (at::GradMode::is_enabled()) {
      // create_graph: the backward in differentiable ops, so the double backward (second-order MAML through a
      // task_linear forward, gradgradcheck) is autograd's. Same math as the fused kernel.
      const at::Tensor dz = activation_backward(grad, out, activation);
      if (mask[0]) result[0] = at::bmm(dz, weight);
      if (mask[1]) result[1] = at::bmm(dz.transpose(1, 2), x);
      if (mask[2]) result[2] = dz.sum(1);
      return result;
    }
    // No graph wanted: the fused kernel, called below autograd (the backward op's own autograd kernel is
    // Python and would cost ~10 us for nothing here).
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [d_x, d_w, d_b] = backward_op.call(grad, x, weight, out, activation, mask);
    if (mask[0]) result[0] = d_x;
    if (mask[1]) result[1] = d_w;
    if (mask[2]) result[2] = d_b;
    return result;
  }
};

}  // namespace

at::Tensor task_linear_autograd(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                c10::string_view activation) {
  return TaskLinearFunction::apply(x, weight, bias, activation);
}

void register_task_linear_cpu(torch::Library& m) {
  m.impl("task_linear", &task_linear_cpu);
  m.impl("task_linear_backward", &task_linear_backward_cpu);
}

}  // namespace metakernels

// See the file comment: AutogradCPU, alive for the life of the process like inner_step's C++ autograd.
TORCH_LIBRARY_IMPL(metakernels, AutogradCPU, m) { m.impl("task_linear", &metakernels::task_linear_autograd); }
