// CPU kernels of metakernels::pcgrad, pcgrad_out and the stage ops pcgrad_gram, pcgrad_coefficients and
// pcgrad_combine (math in csrc/kernels/pcgrad.h). Not differentiable: the Python registration's autograd
// raises (metakernels/ops/pcgrad.py). Messages match metakernels/reference/pcgrad.py word for word.
#include <vector>

#include "../kernels/pcgrad.h"
#include "common.h"
#include "registrations.h"

namespace metakernels {
namespace {

namespace pk = kernels::pcgrad;

void check_grads(const char* op, const at::Tensor& grads) {
  check_task_batch(op, "grads", grads);
  check_floating(op, "grads", grads);
}

void check_shared_mask(const char* op, const std::optional<at::Tensor>& mask, const at::Tensor& grads) {
  if (!mask.has_value()) return;
  const at::Tensor& m = *mask;
  TORCH_CHECK_TYPE(m.scalar_type() == at::kBool, "metakernels.", op, ": shared_mask must be a bool tensor, got dtype ",
                   m.scalar_type());
  TORCH_CHECK_VALUE(m.dim() == 1 && m.size(0) == grads.size(1), "metakernels.", op,
                    ": shared_mask must be a 1-D [P] tensor with P = ", grads.size(1), " (the columns of grads), got shape ",
                    shape_str(m));
  TORCH_CHECK_VALUE(m.device() == grads.device(), "metakernels.", op, ": shared_mask is on ", m.device(),
                    " but grads is on ", grads.device());
}

std::string row_str(const int64_t* row, int64_t n) {
  std::ostringstream s;
  s << "[";
  for (int64_t k = 0; k < n; ++k) s << (k ? ", " : "") << row[k];
  s << "]";
  return s.str();
}

// Validates orders ([T, T] int64, every row a permutation of 0..T-1); returns it contiguous.
at::Tensor check_orders(const char* op, const at::Tensor& orders, int64_t num_tasks, const at::Device& device) {
  TORCH_CHECK_TYPE(orders.scalar_type() == at::kLong, "metakernels.", op, ": orders must be an int64 tensor, got dtype ",
                   orders.scalar_type());
  TORCH_CHECK_VALUE(orders.dim() == 2 && orders.size(0) == num_tasks && orders.size(1) == num_tasks, "metakernels.", op,
                    ": orders must be a [T, T] tensor with T = ", num_tasks, " (the tasks of grads), got shape ",
                    shape_str(orders));
  TORCH_CHECK_VALUE(orders.device() == device, "metakernels.", op, ": orders is on ", orders.device(),
                    " but grads is on ", device);
  at::Tensor o = orders.contiguous();
  const int64_t* p = o.data_ptr<int64_t>();
  std::vector<char> seen(num_tasks);
  for (int64_t i = 0; i < num_tasks; ++i) {
    std::fill(seen.begin(), seen.end(), 0);
    bool ok = true;
    for (int64_t s = 0; s < num_tasks && ok; ++s) {
      const int64_t j = p[i * num_tasks + s];
      ok = j >= 0 && j < num_tasks && !seen[j];
      if (ok) seen[j] = 1;
    }
    TORCH_CHECK_VALUE(ok, "metakernels.", op, ": orders row ", i, " must be a permutation of 0..T-1 (T = ", num_tasks,
                      "), got ", row_str(p + i * num_tasks, num_tasks));
  }
  return o;
}

void check_options(const char* op, c10::string_view reduction, double eps) {
  TORCH_CHECK_VALUE(reduction == "sum" || reduction == "mean", "metakernels.", op,
                    ": reduction must be 'sum' or 'mean', got '", std::string(reduction), "'");
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0.0, "metakernels.", op, ": eps must be finite and >= 0, got ", eps);
}

// Python's repr of a float, for messages that match the reference's (nan, inf, -inf).
std::string float_str(double v) {
  if (std::isnan(v)) return "nan";
  if (std::isinf(v)) return v > 0 ? "inf" : "-inf";
  std::ostringstream s;
  s << v;
  return s.str();
}

void check_gram_diagonal(const char* op, const char* name, const double* K, int64_t n) {
  for (int64_t t = 0; t < n; ++t) {
    const double v = K[t * n + t];
    if (std::isfinite(v)) continue;
    if (std::string(name) == "grads")
      TORCH_CHECK_VALUE(false, "metakernels.", op, ": grads has a non-finite squared norm (", float_str(v), ") in task ",
                        t, ": it contains NaN or inf (or values too large to square)");
    TORCH_CHECK_VALUE(false, "metakernels.", op, ": ", name, " has a non-finite diagonal entry (", float_str(v),
                      ") at task ", t);
  }
}

// grads as the kernels read it: float32 or float64 (bf16/half converted to float32: a copy), unit column
// stride (any row stride, also 0: rows are only read). Other layouts are copied once.
at::Tensor kernel_view(const at::Tensor& grads) {
  at::Tensor g = grads;
  if (g.scalar_type() != at::kFloat && g.scalar_type() != at::kDouble) g = g.to(at::kFloat);
  if (g.size(1) > 1 && g.stride(1) != 1) g = g.contiguous();
  return g;
}

int64_t row_stride(const at::Tensor& g) { return g.size(0) > 1 ? g.stride(0) : g.size(1); }

// The shared columns as maximal runs: one scan of the [P] mask (not of G).
std::vector<pk::Run> shared_runs(const std::optional<at::Tensor>& mask, int64_t cols) {
  std::vector<pk::Run> runs;
  if (!mask.has_value()) {
    runs.push_back({0, cols});
    return runs;
  }
  const at::Tensor m = mask->contiguous();
  const bool* p = m.data_ptr<bool>();
  int64_t c = 0;
  while (c < cols) {
    while (c < cols && !p[c]) ++c;
    const int64_t b = c;
    while (c < cols && p[c]) ++c;
    if (c > b) runs.push_back({b, c});
  }
  return runs;
}

at::Tensor gram_of(const at::Tensor& g, const std::vector<pk::Run>& runs) {
  const int64_t T = g.size(0);
  at::Tensor K = at::empty({T, T}, g.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "pcgrad_gram_cpu", [&] {
    pk::gram<scalar_t>(g.data_ptr<scalar_t>(), T, row_stride(g), runs, K.data_ptr<double>(), torch_threads());
  });
  return K;
}

// out = coef^T G (shared) / 1^T G (task-specific). Returns false on NaN/inf in a task-specific sum.
bool combine_into(const at::Tensor& g, const std::vector<double>& coef, const std::vector<pk::Run>& runs,
                  bool all_shared, at::Tensor& out) {
  const int64_t T = g.size(0), P = g.size(1);
  const bool direct = out.scalar_type() == g.scalar_type() && out.is_contiguous();
  at::Tensor dst = direct ? out : at::empty({P}, g.options());
  bool ok = true;
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "pcgrad_combine_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<acc_t> c(coef.begin(), coef.end());
    ok = pk::combine<scalar_t, acc_t>(g.data_ptr<scalar_t>(), T, P, row_stride(g), c.data(), runs, all_shared,
                                      dst.data_ptr<scalar_t>(), torch_threads());
  });
  if (!direct) out.copy_(dst);
  return ok;
}

constexpr const char* kOp = "pcgrad";

// The fused op: Gram, coefficients, combine. Writes the update into out; returns W.
at::Tensor pcgrad_into(const at::Tensor& grads, const at::Tensor& orders, const std::optional<at::Tensor>& shared_mask,
                       bool include_self, c10::string_view reduction, double eps, at::Tensor& out) {
  const int64_t T = grads.size(0);
  const at::Tensor order = check_orders(kOp, orders, T, grads.device());
  check_shared_mask(kOp, shared_mask, grads);
  check_options(kOp, reduction, eps);
  const at::Tensor g = kernel_view(grads);
  const std::vector<pk::Run> runs = shared_runs(shared_mask, g.size(1));
  const at::Tensor K = gram_of(g, runs);
  // NaN/inf in the shared columns of G shows up on K's diagonal: validation without a pass of its own.
  check_gram_diagonal(kOp, "grads", K.data_ptr<double>(), T);
  at::Tensor Wm = at::empty({T, T}, K.options());
  pk::coefficients(K.data_ptr<double>(), T, order.data_ptr<int64_t>(), include_self, eps, Wm.data_ptr<double>());
  const double r = reduction == "mean" ? 1.0 / double(T) : 1.0;
  std::vector<double> coef(T, 0.0);
  const double* w = Wm.data_ptr<double>();
  for (int64_t i = 0; i < T; ++i)
    for (int64_t k = 0; k < T; ++k) coef[k] += w[i * T + k];
  for (double& c : coef) c *= r;
  const bool ok = combine_into(g, coef, runs, !shared_mask.has_value(), out);
  TORCH_CHECK_VALUE(ok, "metakernels.", kOp,
                    ": grads has NaN or inf in its task-specific columns (shared_mask False)");
  return Wm;
}

std::tuple<at::Tensor, at::Tensor> pcgrad_cpu(const at::Tensor& grads, const at::Tensor& orders,
                                              const std::optional<at::Tensor>& shared_mask, bool include_self,
                                              c10::string_view reduction, double eps) {
  check_grads(kOp, grads);
  at::Tensor out = at::empty({grads.size(1)}, grads.options());
  at::Tensor Wm = pcgrad_into(grads, orders, shared_mask, include_self, reduction, eps, out);
  return {out, Wm};
}

at::Tensor pcgrad_out_cpu(const at::Tensor& grads, const at::Tensor& orders, const std::optional<at::Tensor>& shared_mask,
                          bool include_self, c10::string_view reduction, double eps, at::Tensor out) {
  check_grads(kOp, grads);
  TORCH_CHECK_VALUE(out.dim() == 1 && out.size(0) == grads.size(1) && out.is_contiguous(),
                    "metakernels.pcgrad: out must be a contiguous 1-D [P] tensor with P = ", grads.size(1),
                    ", got shape ", shape_str(out), out.is_contiguous() ? "" : " (non-contiguous)");
  TORCH_CHECK_TYPE(out.scalar_type() == grads.scalar_type(), "metakernels.pcgrad: out has dtype ", out.scalar_type(),
                   " but grads has dtype ", grads.scalar_type());
  TORCH_CHECK_VALUE(out.device() == grads.device(), "metakernels.pcgrad: out is on ", out.device(), " but grads is on ",
                    grads.device());
  return pcgrad_into(grads, orders, shared_mask, include_self, reduction, eps, out);
}

// --- stage ops ---------------------------------------------------------------------------------------------

at::Tensor pcgrad_gram_cpu(const at::Tensor& grads, const std::optional<at::Tensor>& shared_mask) {
  constexpr const char* op = "pcgrad_gram";
  check_grads(op, grads);
  check_shared_mask(op, shared_mask, grads);
  const at::Tensor g = kernel_view(grads);
  return gram_of(g, shared_runs(shared_mask, g.size(1)));
}

at::Tensor pcgrad_coefficients_cpu(const at::Tensor& gram, const at::Tensor& orders, bool include_self, double eps) {
  constexpr const char* op = "pcgrad_coefficients";
  TORCH_CHECK_VALUE(gram.dim() == 2 && gram.size(0) == gram.size(1) && gram.size(0) > 0, "metakernels.", op,
                    ": gram must be a square [T, T] tensor with T >= 1, got shape ", shape_str(gram));
  TORCH_CHECK_TYPE(gram.scalar_type() == at::kDouble, "metakernels.", op, ": gram must be a float64 tensor, got dtype ",
                   gram.scalar_type());
  const int64_t T = gram.size(0);
  const at::Tensor order = check_orders(op, orders, T, gram.device());
  check_options(op, "sum", eps);
  const at::Tensor K = gram.contiguous();
  check_gram_diagonal(op, "gram", K.data_ptr<double>(), T);
  at::Tensor Wm = at::empty({T, T}, K.options());
  pk::coefficients(K.data_ptr<double>(), T, order.data_ptr<int64_t>(), include_self, eps, Wm.data_ptr<double>());
  return Wm;
}

at::Tensor pcgrad_combine_cpu(const at::Tensor& grads, const at::Tensor& weights,
                              const std::optional<at::Tensor>& shared_mask) {
  constexpr const char* op = "pcgrad_combine";
  check_grads(op, grads);
  check_shared_mask(op, shared_mask, grads);
  TORCH_CHECK_VALUE(weights.dim() == 1 && weights.size(0) == grads.size(0), "metakernels.", op,
                    ": weights must be a 1-D [T] tensor with T = ", grads.size(0), " (the tasks of grads), got shape ",
                    shape_str(weights));
  check_floating(op, "weights", weights);
  TORCH_CHECK_VALUE(weights.device() == grads.device(), "metakernels.", op, ": weights is on ", weights.device(),
                    " but grads is on ", grads.device());
  const at::Tensor w = weights.to(at::kDouble).contiguous();
  const std::vector<double> coef(w.data_ptr<double>(), w.data_ptr<double>() + w.numel());
  const at::Tensor g = kernel_view(grads);
  at::Tensor out = at::empty({grads.size(1)}, grads.options());
  combine_into(g, coef, shared_runs(shared_mask, g.size(1)), !shared_mask.has_value(), out);
  return out;
}

}  // namespace

void register_pcgrad_cpu(torch::Library& m) {
  m.impl("pcgrad", &pcgrad_cpu);
  m.impl("pcgrad_out", &pcgrad_out_cpu);
  m.impl("pcgrad_gram", &pcgrad_gram_cpu);
  m.impl("pcgrad_coefficients", &pcgrad_coefficients_cpu);
  m.impl("pcgrad_combine", &pcgrad_combine_cpu);
}

}  // namespace metakernels
