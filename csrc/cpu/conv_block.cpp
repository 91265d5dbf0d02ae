// CPU kernels of metakernels::conv_block and conv_block_backward (math: csrc/kernels/conv_block.h and
// metakernels/reference/conv_block.py).
//
// Where the time goes (Omniglot 4-conv net, T = 8 tasks x 75 query images; noisy shared 2-core VM):
// - Convolutions of 64 -> 64 channels run through at::convolution / at::convolution_backward (oneDNN), one
//   call per task on channels_last inputs. Measured on the 14x14 layer (2 threads): forward 35 ms per-task
//   channels_last vs 62 ms per-task NCHW vs 37 ms as one grouped conv; backward (d_x, d_w) 74 ms per-task
//   channels_last vs 107 ms NCHW vs 96 ms grouped; im2col + bmm 58 ms for the forward GEMM alone. So
//   activations stay channels-last per image between blocks: physical [T, N, H, W, C]. These convolutions
//   are ~70% of the net's forward+backward; the epilogue below ~15%.
// - A layer with few taps (Cin*k*k <= 27: the 1-channel input layer) is a poor GEMM (K = 9): oneDNN took
//   39 ms forward and 25 ms for the weight gradient (1 thread) before any epilogue over its 120 MB output.
//   Here it runs as a register-tiled direct convolution fused with the epilogue that never stores the conv
//   output: the forward computes each row twice (statistics, then normalise+pool), the backward twice more
//   (sums, then dz folded into the weight gradient), all from L1-resident rows: 34 ms forward and 42 ms
//   backward including the epilogue (1 thread).
// - The epilogue (batch statistics, normalise, ReLU, 2x2 max-pool; and its backward) is two passes over
//   the conv output per direction, vectorised over channels, threaded over images.
#ifdef __linux__
#include <sys/mman.h>
#endif

#include "../kernels/conv_block.h"
#include "common.h"
#include "registrations.h"

namespace metakernels {
namespace {

constexpr const char* kOp = "conv_block";
// Mirrors metakernels/reference/conv_block.py RECOMPUTE_MAX_TAPS: up to this many taps (Cin * k * k) the
// conv output is not returned for the backward but recomputed by the direct convolution.
constexpr int64_t kRecomputeMaxTaps = 27;

struct Geometry {
  int64_t T, N, Cin, H, W, Cout, k, Ho, Wo, Hp, Wp;
  bool direct;
};

void check_task_vector(const char* name, const std::optional<at::Tensor>& t, const at::Tensor& x, int64_t cout) {
  if (!t.has_value()) return;
  check_like(kOp, name, *t, "x", x);
  TORCH_CHECK_VALUE(t->dim() == 2 && t->size(0) == x.size(0) && t->size(1) == cout, "metakernels.conv_block: ", name,
                    " must be [T, Cout] = [", x.size(0), ", ", cout, "], got ", shape_str(*t));
}

Geometry check_args(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                    const std::optional<at::Tensor>& bn_weight, const std::optional<at::Tensor>& bn_bias,
                    int64_t stride, int64_t padding, double eps, bool pool) {
  TORCH_CHECK_VALUE(x.dim() == 5, "metakernels.conv_block: x must be a 5-D [T, N, Cin, H, W] tensor, got shape ",
                    shape_str(x));
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
                   "metakernels.conv_block: x must be float32 or float64, got dtype ", x.scalar_type());
  Geometry g{};
  g.T = x.size(0), g.N = x.size(1), g.Cin = x.size(2), g.H = x.size(3), g.W = x.size(4);
  TORCH_CHECK_VALUE(g.T > 0, "metakernels.conv_block: x is an empty task batch (T = 0)");
  TORCH_CHECK_VALUE(g.N > 0, "metakernels.conv_block: x has no images (N = 0)");
  TORCH_CHECK_VALUE(g.Cin > 0, "metakernels.conv_block: x has no channels (Cin = 0)");
  TORCH_CHECK_VALUE(weight.dim() == 5,
                    "metakernels.conv_block: weight must be a 5-D [T, Cout, Cin, k, k] tensor, got shape ",
                    shape_str(weight));
  check_like(kOp, "weight", weight, "x", x);
  TORCH_CHECK_VALUE(weight.size(0) == g.T, "metakernels.conv_block: weight has ", weight.size(0),
                    " tasks but x has ", g.T);
  TORCH_CHECK_VALUE(weight.size(2) == g.Cin, "metakernels.conv_block: weight expects Cin = ", weight.size(2),
                    " input channels but x has ", g.Cin);
  g.Cout = weight.size(1), g.k = weight.size(3);
  TORCH_CHECK_VALUE(weight.size(4) == g.k && g.k > 0,
                    "metakernels.conv_block: weight must have a square, non-empty k x k kernel, got ", g.k, " x ",
                    weight.size(4));
  TORCH_CHECK_VALUE(g.Cout > 0, "metakernels.conv_block: weight has no output channels (Cout = 0)");
  check_task_vector("bias", bias, x, g.Cout);
  check_task_vector("bn_weight", bn_weight, x, g.Cout);
  check_task_vector("bn_bias", bn_bias, x, g.Cout);
  TORCH_CHECK_VALUE(stride >= 1, "metakernels.conv_block: stride must be >= 1, got ", stride);
  TORCH_CHECK_VALUE(padding >= 0, "metakernels.conv_block: padding must be >= 0, got ", padding);
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps > 0, "metakernels.conv_block: eps must be finite and > 0, got ", eps);
  TORCH_CHECK_VALUE(g.H + 2 * padding >= g.k && g.W + 2 * padding >= g.k, "metakernels.conv_block: x's spatial size ",
                    g.H, " x ", g.W, " (padding ", padding, ") is smaller than the ", g.k, " x ", g.k, " kernel");
  g.Ho = (g.H + 2 * padding - g.k) / stride + 1;
  g.Wo = (g.W + 2 * padding - g.k) / stride + 1;
  TORCH_CHECK_VALUE(g.N * g.Ho * g.Wo >= 2,
                    "metakernels.conv_block: x gives one conv output value per channel (N * H' * W' = ", g.N, " * ",
                    g.Ho, " * ", g.Wo, "): batch-norm variance needs at least two");
  TORCH_CHECK_VALUE(!pool || (g.Ho >= 2 && g.Wo >= 2),
                    "metakernels.conv_block: pool needs a conv output of at least 2 x 2, got ", g.Ho, " x ", g.Wo,
                    " from x of ", g.H, " x ", g.W);
  g.Hp = pool ? g.Ho / 2 : g.Ho;
  g.Wp = pool ? g.Wo / 2 : g.Wo;
  g.direct = g.Cin * g.k * g.k <= kRecomputeMaxTaps;
  return g;
}

// Asks for transparent huge pages on a large fresh output before its first touch. Outputs of tens of MB
// (the block output, the saved conv output, d_x at T = 32: 120 MB each) come from mmap and cost a page
// fault per 4 KB on first write: measured 35 ms to fault in 120 MB, 13 ms with huge pages; the second block's
// forward at T = 32 (150 MB of outputs) took 350 ms of CPU instead of 400 (min of 8, 1 thread). Only a hint:
// THP off, or memory that is already mapped, makes it a no-op.
void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const size_t bytes = t.numel() * t.element_size();
  if (bytes < 4 * kHuge) return;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t last = (begin + bytes) & ~(kHuge - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

// A [T, N, C, H, W] tensor whose physical order is [T, N, H, W, C]: channels last per image.
at::Tensor empty_channels_last_per_image(int64_t T, int64_t N, int64_t C, int64_t H, int64_t W,
                                         const at::TensorOptions& opts) {
  at::Tensor t = at::empty({T, N, H, W, C}, opts);
  advise_huge_pages(t);
  return t.permute({0, 1, 4, 2, 3});
}

// Raw [T, N, H, W, C] storage of a [T, N, C, H, W] tensor (a view when it already has that order).
at::Tensor physical_nhwc(const at::Tensor& t) { return t.permute({0, 1, 3, 4, 2}).contiguous(); }

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

at::Tensor optional_contiguous(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->contiguous() : at::Tensor();
}

// One task's input as a channels_last [N, Cin, H, W] tensor (a view for the layout blocks return).
at::Tensor task_input(const at::Tensor& x, int64_t t) {
  return x.select(0, t).contiguous(at::MemoryFormat::ChannelsLast);
}

// All tasks' weights as channels_last [Cout, Cin, k, k] slices: oneDNN converts a contiguous weight to the
// input's memory format on every call (one small copy and one parallel region per task and direction).
at::Tensor channels_last_weights(const at::Tensor& weight) {
  const auto sz = weight.sizes();
  at::Tensor w = at::empty({sz[0], sz[1], sz[3], sz[4], sz[2]}, weight.options());
  w.copy_(weight.permute({0, 1, 3, 4, 2}));
  return w.permute({0, 1, 4, 2, 3});
}

at::Tensor task_conv(const at::Tensor& x_t, const at::Tensor& w_t, int64_t stride, int64_t padding) {
  return at::convolution(x_t, w_t, std::nullopt, {stride, stride}, {padding, padding}, {1, 1}, false, {0, 0}, 1)
      .contiguous(at::MemoryFormat::ChannelsLast);
}

// The padded input [T, N, Cin, H + 2p, W + 2p] and tap-major weight [T, Cin*k*k, Cout] of the direct path.
std::pair<at::Tensor, at::Tensor> direct_operands(const at::Tensor& x, const at::Tensor& weight, int64_t padding) {
  at::Tensor xpad = at::constant_pad_nd(x, {padding, padding, padding, padding}, 0).contiguous();
  at::Tensor wt = weight.permute({0, 2, 3, 4, 1}).contiguous();
  return {xpad, wt};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_block_cpu(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& bn_weight, const std::optional<at::Tensor>& bn_bias, int64_t stride,
    int64_t padding, double eps, bool pool) {
  const Geometry g = check_args(x, weight, bias, bn_weight, bn_bias, stride, padding, eps, pool);
  const auto opts = x.options();
  at::Tensor out = empty_channels_last_per_image(g.T, g.N, g.Cout, g.Hp, g.Wp, opts);
  at::Tensor out_raw = out.permute({0, 1, 3, 4, 2});  // [T, N, Hp, Wp, C], contiguous
  at::Tensor mean = at::empty({g.T, g.Cout}, opts);
  at::Tensor invstd = at::empty({g.T, g.Cout}, opts);
  const at::Tensor gamma = optional_contiguous(bn_weight);
  const at::Tensor beta = optional_contiguous(bn_bias);
  const kernels::BlockShape s{g.N, g.Ho, g.Wo, g.Cout, pool};
  const int threads = torch_threads();
  // The bias is not applied: batch normalisation subtracts it again (y does not depend on it).
  at::Tensor conv_out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv_block_cpu", [&] {
    const scalar_t* gp = ptr_or_null<scalar_t>(gamma);
    const scalar_t* bp = ptr_or_null<scalar_t>(beta);
    scalar_t* op = out_raw.data_ptr<scalar_t>();
    scalar_t* mp = mean.data_ptr<scalar_t>();
    scalar_t* ip = invstd.data_ptr<scalar_t>();
    const int64_t out_task = g.N * g.Hp * g.Wp * g.Cout;
    if (g.direct) {
      auto [xpad, wt] = direct_operands(x, weight, padding);
      const kernels::DirectConv d{g.Cin, g.H + 2 * padding, g.W + 2 * padding, g.k, stride};
      for (int64_t t = 0; t < g.T; ++t) {
        const kernels::DirectRows<scalar_t> rows{xpad.data_ptr<scalar_t>() + t * g.N * g.Cin * d.Hpad * d.Wpad,
                                                 wt.data_ptr<scalar_t>() + t * d.taps() * g.Cout, d, &s};
        kernels::block_forward<scalar_t>(rows, s, gp ? gp + t * g.Cout : nullptr, bp ? bp + t * g.Cout : nullptr, eps,
                                         op + t * out_task, mp + t * g.Cout, ip + t * g.Cout, nullptr, threads);
      }
      conv_out = at::empty({0}, opts);
    } else {
      conv_out = empty_channels_last_per_image(g.T, g.N, g.Cout, g.Ho, g.Wo, opts);
      scalar_t* zp = conv_out.data_ptr<scalar_t>();
      const int64_t z_task = g.N * g.Ho * g.Wo * g.Cout;
      const at::Tensor w_cl = channels_last_weights(weight);
      for (int64_t t = 0; t < g.T; ++t) {
        // oneDNN writes a fresh tensor; the statistics pass copies it into conv_out while reading it anyway.
        const at::Tensor z = task_conv(task_input(x, t), w_cl.select(0, t), stride, padding);
        const kernels::StoredRows<scalar_t> rows{z.data_ptr<scalar_t>(), &s};
        kernels::block_forward<scalar_t>(rows, s, gp ? gp + t * g.Cout : nullptr, bp ? bp + t * g.Cout : nullptr, eps,
                                         op + t * out_task, mp + t * g.Cout, ip + t * g.Cout, zp + t * z_task,
                                         threads);
      }
    }
  });
  return {out, conv_out, mean, invstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_block_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
    const std::optional<at::Tensor>& bn_weight, const std::optional<at::Tensor>& bn_bias, const at::Tensor& conv_out,
    const at::Tensor& mean_in, const at::Tensor& invstd_in, int64_t stride, int64_t padding, bool pool,
    std::array<bool, 5> output_mask) {
  const Geometry g = check_args(x, weight, std::nullopt, bn_weight, bn_bias, stride, padding, 1.0, pool);
  constexpr const char* kBw = "conv_block_backward";
  check_like(kBw, "grad_out", grad_out, "x", x);
  TORCH_CHECK_VALUE(grad_out.dim() == 5 && grad_out.size(0) == g.T && grad_out.size(1) == g.N &&
                        grad_out.size(2) == g.Cout && grad_out.size(3) == g.Hp && grad_out.size(4) == g.Wp,
                    "metakernels.conv_block_backward: grad_out must be the block output's shape [", g.T, ", ", g.N,
                    ", ", g.Cout, ", ", g.Hp, ", ", g.Wp, "], got ", shape_str(grad_out));
  check_like(kBw, "conv_out", conv_out, "x", x);
  const bool saved = conv_out.numel() != 0;
  TORCH_CHECK_VALUE(!saved || (conv_out.dim() == 5 && conv_out.size(0) == g.T && conv_out.size(1) == g.N &&
                               conv_out.size(2) == g.Cout && conv_out.size(3) == g.Ho && conv_out.size(4) == g.Wo),
                    "metakernels.conv_block_backward: conv_out must be empty or [", g.T, ", ", g.N, ", ", g.Cout, ", ",
                    g.Ho, ", ", g.Wo, "], got ", shape_str(conv_out));
  for (auto [name, t] : {std::pair<const char*, const at::Tensor*>{"mean", &mean_in}, {"invstd", &invstd_in}}) {
    check_like(kBw, name, *t, "x", x);
    TORCH_CHECK_VALUE(t->dim() == 2 && t->size(0) == g.T && t->size(1) == g.Cout, "metakernels.conv_block_backward: ",
                      name, " must be [T, Cout] = [", g.T, ", ", g.Cout, "], got ", shape_str(*t));
  }
  const auto opts = x.options();
  const bool want_x = output_mask[0], want_w = output_mask[1];
  const bool want_g = output_mask[3] && bn_weight.has_value(), want_b = output_mask[4] && bn_bias.has_value();
  auto empty = [&]() { return at::empty({0}, opts); };
  at::Tensor d_x = want_x ? empty_channels_last_per_image(g.T, g.N, g.Cin, g.H, g.W, opts) : empty();
  at::Tensor d_w = want_w ? at::empty(weight.sizes(), opts) : empty();
  // The conv bias cancels in the normalisation: its gradient is exactly zero.
  at::Tensor d_bias = output_mask[2] ? at::zeros({g.T, g.Cout}, opts) : empty();
  at::Tensor d_gamma = want_g ? at::empty({g.T, g.Cout}, opts) : empty();
  at::Tensor d_beta = want_b ? at::empty({g.T, g.Cout}, opts) : empty();
  if (!(want_x || want_w || want_g || want_b)) return {d_x, d_w, d_bias, d_gamma, d_beta};

  const at::Tensor go = physical_nhwc(grad_out);
  const at::Tensor mean = mean_in.contiguous(), invstd = invstd_in.contiguous();
  const at::Tensor gamma = optional_contiguous(bn_weight);
  const at::Tensor beta = optional_contiguous(bn_bias);
  const kernels::BlockShape s{g.N, g.Ho, g.Wo, g.Cout, pool};
  const int threads = torch_threads();
  const bool want_dz = want_x || want_w;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv_block_backward_cpu", [&] {
    const scalar_t* gp = ptr_or_null<scalar_t>(gamma);
    const scalar_t* bp = ptr_or_null<scalar_t>(beta);
    const scalar_t* mp = mean.data_ptr<scalar_t>();
    const scalar_t* ip = invstd.data_ptr<scalar_t>();
    scalar_t* dgp = want_g ? d_gamma.data_ptr<scalar_t>() : nullptr;
    scalar_t* dbp = want_b ? d_beta.data_ptr<scalar_t>() : nullptr;
    const int64_t go_task = g.N * g.Hp * g.Wp * g.Cout;
    auto task_ptr = [&](const scalar_t* p, int64_t t) { return p ? p + t * g.Cout : nullptr; };
    auto task_mut = [&](scalar_t* p, int64_t t) { return p ? p + t * g.Cout : nullptr; };
    if (g.direct && !want_x) {
      // Fused: z rows recomputed twice, dz folded into the weight gradient, nothing of size N*H*W*C stored.
      auto [xpad, wt] = direct_operands(x, weight, padding);
      const kernels::DirectConv d{g.Cin, g.H + 2 * padding, g.W + 2 * padding, g.k, stride};
      at::Tensor dw_taps = want_w ? at::empty({g.T, d.taps(), g.Cout}, opts) : at::Tensor();
      for (int64_t t = 0; t < g.T; ++t) {
        const scalar_t* xt = xpad.data_ptr<scalar_t>() + t * g.N * g.Cin * d.Hpad * d.Wpad;
        const kernels::DirectRows<scalar_t> rows{xt, wt.data_ptr<scalar_t>() + t * d.taps() * g.Cout, d, &s};
        const kernels::DzToDirectWeight<scalar_t> sink{xt, d, &s};
        kernels::block_backward<scalar_t>(rows, sink, s, go.data_ptr<scalar_t>() + t * go_task, task_ptr(gp, t),
                                          task_ptr(bp, t), mp + t * g.Cout, ip + t * g.Cout, task_mut(dgp, t),
                                          task_mut(dbp, t), want_w,
                                          want_w ? dw_taps.data_ptr<scalar_t>() + t * d.taps() * g.Cout : nullptr,
                                          d.taps(), threads);
      }
      if (want_w) d_w.copy_(dw_taps.view({g.T, g.Cin, g.k, g.k, g.Cout}).permute({0, 4, 1, 2, 3}));
      return;
    }
    // dz of one task at a time into one reused buffer, then the conv backward of that task through torch.
    at::Tensor dz = want_dz ? at::empty({g.N, g.Cout, g.Ho, g.Wo}, opts.memory_format(at::MemoryFormat::ChannelsLast))
                            : at::Tensor();
    const int64_t z_task = g.N * g.Ho * g.Wo * g.Cout;
    const at::Tensor z_all = saved ? physical_nhwc(conv_out) : at::Tensor();
    const at::Tensor w_cl = channels_last_weights(weight);
    std::vector<at::Tensor> d_w_tasks;
    for (int64_t t = 0; t < g.T; ++t) {
      const at::Tensor x_t = task_input(x, t);
      const at::Tensor w_t = w_cl.select(0, t);
      at::Tensor z_t;  // keeps a recomputed conv output alive for the task
      const scalar_t* zp;
      if (saved) {
        zp = z_all.data_ptr<scalar_t>() + t * z_task;
      } else {
        z_t = task_conv(x_t, w_t, stride, padding);
        zp = z_t.data_ptr<scalar_t>();
      }
      const kernels::StoredRows<scalar_t> rows{zp, &s};
      const kernels::DzToBuffer<scalar_t> sink{want_dz ? dz.data_ptr<scalar_t>() : nullptr, &s};
      kernels::block_backward<scalar_t>(rows, sink, s, go.data_ptr<scalar_t>() + t * go_task, task_ptr(gp, t),
                                        task_ptr(bp, t), mp + t * g.Cout, ip + t * g.Cout, task_mut(dgp, t),
                                        task_mut(dbp, t), want_dz, nullptr, 0, threads);
      if (!want_dz) continue;
      auto [gx, gw, gb] = at::convolution_backward(dz, x_t, w_t, std::nullopt, {stride, stride}, {padding, padding},
                                                   {1, 1}, false, {0, 0}, 1, {want_x, want_w, false});
      if (want_x) d_x.select(0, t).copy_(gx);
      if (want_w) d_w_tasks.push_back(gw);
    }
    if (want_w) at::stack_out(d_w, d_w_tasks);  // one copy (a layout change) for all tasks
  });
  return {d_x, d_w, d_bias, d_gamma, d_beta};
}

void register_conv_block_cpu(torch::Library& m) {
  m.impl("conv_block", &conv_block_cpu);
  m.impl("conv_block_backward", &conv_block_backward_cpu);
}

}  // namespace metakernels
