// The noprop_ext ops: schemas, argument checks, CPU kernels and the Python module noprop._C.
//
// The CPU kernels are host loops over rows (one row = one example of one block, D embedding
// dimensions) parallelised with at::parallel_for; they call the per-element math of
// noprop_math.h, the same functions the CUDA kernels (noprop_cuda.cu) run. Sums over rows that
// several threads share (the W gradients) go through one partial sum per thread chunk, added up in
// chunk order, so a result does not depend on thread timing.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "noprop_math.h"
#include "noprop_ops.h"
#include "philox_lanes.h"

#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11 && defined(__x86_64__)
#define NOPROP_CPU_DISPATCH __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define NOPROP_CPU_DISPATCH
#endif

namespace noprop {

// ================================================================================== argument checks

namespace {

const char* dtype_name(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return "float32";
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    case at::kDouble: return "float64";
    case at::kLong: return "int64";
    case at::kInt: return "int32";
    default: return c10::toString(dtype);
  }
}

void check_device_and_layout(const char* op, const char* name, const at::Tensor& tensor, at::Device device) {
  TORCH_CHECK(tensor.device() == device, op, ": ", name, ": expected a tensor on ", device,
              " (the device of the other inputs), got one on ", tensor.device());
  TORCH_CHECK(tensor.is_contiguous(), op, ": ", name, ": expected a contiguous tensor");
}

void check_shape(const char* op, const char* name, const at::Tensor& tensor, at::IntArrayRef shape) {
  TORCH_CHECK(tensor.sizes() == shape, op, ": ", name, ": expected shape ", shape, ", got ", tensor.sizes());
}

// Logits and latents: float32 everywhere, float16 and bfloat16 on CUDA.
void check_activation_dtype(const char* op, const char* name, const at::Tensor& tensor) {
  const auto dtype = tensor.scalar_type();
  const bool cuda = tensor.is_cuda();
  const bool ok = dtype == at::kFloat || (cuda && (dtype == at::kHalf || dtype == at::kBFloat16));
  TORCH_CHECK(ok, op, ": ", name, ": expected dtype ", cuda ? "float32, float16 or bfloat16" : "float32",
              " on ", tensor.device().type(), ", got ", dtype_name(dtype));
}

// W: [C, D], float32 (on CUDA also float16 or bfloat16, computed in float32).
void check_embedding(const char* op, const at::Tensor& W, at::Device device) {
  check_device_and_layout(op, "W", W, device);
  check_activation_dtype(op, "W", W);
  TORCH_CHECK(W.dim() == 2, op, ": W: expected the embedding matrix [C, D], got shape ", W.sizes());
  TORCH_CHECK(W.size(0) > 0 && W.size(1) > 0 && W.size(0) <= std::numeric_limits<int>::max() &&
                  W.size(1) <= std::numeric_limits<int>::max(),
              op, ": W: expected 1 <= C, D < 2**31, got shape ", W.sizes());
}

// y: int64 [B].
void check_labels(const char* op, const at::Tensor& y, at::Device device) {
  check_device_and_layout(op, "y", y, device);
  TORCH_CHECK(y.dim() == 1, op, ": y: expected class labels of shape [B], got shape ", y.sizes());
  TORCH_CHECK(y.scalar_type() == at::kLong, op, ": y: expected dtype int64, got ", dtype_name(y.scalar_type()));
}

}  // namespace

void check_tensor(const char* op, const char* name, const at::Tensor& tensor, at::ScalarType dtype,
                  at::IntArrayRef shape, at::Device device) {
  check_device_and_layout(op, name, tensor, device);
  TORCH_CHECK(tensor.scalar_type() == dtype, op, ": ", name, ": expected dtype ", dtype_name(dtype), ", got ",
              dtype_name(tensor.scalar_type()));
  check_shape(op, name, tensor, shape);
}

void check_seed(const char* op, const at::Tensor& seed, at::Device device) {
  check_device_and_layout(op, "seed", seed, device);
  TORCH_CHECK(seed.scalar_type() == at::kLong, op, ": seed: expected dtype int64, got ",
              dtype_name(seed.scalar_type()));
  TORCH_CHECK(seed.numel() == 1, op, ": seed: expected a tensor with one element, got shape ", seed.sizes());
}

EpilogueSizes check_conv_epilogue(const char* op, const at::Tensor& x, const at::Tensor& seed, double p, bool pooled,
                                  int64_t blocks, int64_t block_offset, int64_t row_offset, int64_t stream) {
  TORCH_CHECK(x.dim() == 4, op, ": x: expected conv outputs [B, K, H, W], got shape ", x.sizes());
  TORCH_CHECK(x.is_contiguous() || x.is_contiguous(at::MemoryFormat::ChannelsLast), op,
              ": x: expected a contiguous or channels-last tensor");
  check_activation_dtype(op, "x", x);
  check_seed(op, seed, x.device());
  TORCH_CHECK(p >= 0.0 && p <= 1.0, op, ": p: expected a drop probability in [0, 1], got ", p);
  TORCH_CHECK(blocks >= 1 && x.size(1) % blocks == 0, op, ": blocks: expected a divisor of the ", x.size(1),
              " channels, got ", blocks);
  TORCH_CHECK(!pooled || (x.size(2) >= 2 && x.size(3) >= 2), op, ": x: a 2x2 max-pool needs H, W >= 2, got ",
              x.size(2), "x", x.size(3));
  const int64_t limit = int64_t{1} << 32;
  TORCH_CHECK(block_offset >= 0 && row_offset >= 0 && stream >= 0 && block_offset + blocks <= limit &&
                  row_offset + x.size(0) <= limit && stream < limit,
              op, ": block_offset, row_offset, stream: expected indices in [0, 2**32)");
  EpilogueSizes s{x.size(0), x.size(1), x.size(2), x.size(3), x.size(2), x.size(3), x.size(1) / blocks};
  if (pooled) s.Ho = s.H / 2, s.Wo = s.W / 2;
  TORCH_CHECK(s.C * s.Ho * s.Wo <= limit, op, ": x: at most 2**32 output elements per block and row");
  return s;
}

EpilogueSizes check_conv_epilogue_backward(const char* op, const at::Tensor& grad_y, const at::Tensor& y,
                                           const at::Tensor& argmax, double p, bool pooled, int64_t height,
                                           int64_t width) {
  TORCH_CHECK(y.dim() == 4, op, ": y: expected [B, K, Ho, Wo], got shape ", y.sizes());
  check_activation_dtype(op, "y", y);
  TORCH_CHECK(grad_y.sizes() == y.sizes() && grad_y.scalar_type() == y.scalar_type() && grad_y.device() == y.device(),
              op, ": grad_y: expected y's shape ", y.sizes(), ", dtype and device, got ", grad_y.sizes());
  TORCH_CHECK(p >= 0.0 && p <= 1.0, op, ": p: expected a drop probability in [0, 1], got ", p);
  EpilogueSizes s{y.size(0), y.size(1), height, width, y.size(2), y.size(3), y.size(1)};
  if (pooled) {
    TORCH_CHECK(height / 2 == s.Ho && width / 2 == s.Wo, op, ": height, width: expected the input size of a ",
                s.Ho, "x", s.Wo, " pooled output, got ", height, "x", width);
    TORCH_CHECK(argmax.sizes() == y.sizes() && argmax.strides() == y.strides() && argmax.scalar_type() == at::kByte &&
                    argmax.device() == y.device(),
                op, ": argmax: expected a uint8 tensor shaped and strided like y");
  } else {
    TORCH_CHECK(height == s.Ho && width == s.Wo, op, ": height, width: expected y's size without pooling");
  }
  return s;
}

at::Tensor epilogue_output(const at::Tensor& x, const EpilogueSizes& s, bool contiguous_output, at::ScalarType dtype) {
  const bool channels_last = !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
  const auto format = channels_last && !contiguous_output ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  return at::empty({s.B, s.K, s.Ho, s.Wo}, x.options().dtype(dtype).memory_format(format));
}

at::Tensor epilogue_grad_input(const at::Tensor& y, const EpilogueSizes& s, bool pooled, bool channels_last) {
  const auto options = y.options().memory_format(channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  const bool uncovered = pooled && (s.H % 2 || s.W % 2);  // the last row or column no window reaches
  return uncovered ? at::zeros({s.B, s.K, s.H, s.W}, options) : at::empty({s.B, s.K, s.H, s.W}, options);
}

BlockSizes check_noised_latents(const char* op, const at::Tensor& W, const at::Tensor& y, const at::Tensor& a,
                                const at::Tensor& b, const at::Tensor& seed) {
  const auto device = W.device();
  check_embedding(op, W, device);
  check_labels(op, y, device);
  TORCH_CHECK(a.dim() == 2, op, ": a: expected shape [T, B], got ", a.sizes());
  const BlockSizes s{a.size(0), y.size(0), W.size(0), W.size(1)};
  check_tensor(op, "a", a, at::kFloat, {s.T, s.B}, device);
  check_tensor(op, "b", b, at::kFloat, {s.T, s.B}, device);
  check_seed(op, seed, device);
  return s;
}

BlockSizes check_denoising_loss(const char* op, const at::Tensor& logits, const at::Tensor& W, const at::Tensor& y,
                                const at::Tensor& weight, const std::optional<at::Tensor>& noise_coef,
                                const std::optional<at::Tensor>& seed) {
  const auto device = logits.device();
  check_embedding(op, W, device);
  check_device_and_layout(op, "logits", logits, device);
  check_activation_dtype(op, "logits", logits);
  TORCH_CHECK(logits.dim() == 3 && logits.size(2) == W.size(0), op, ": logits: expected shape [T, B, ", W.size(0),
              "] (C = W.shape[0]), got ", logits.sizes());
  const BlockSizes s{logits.size(0), logits.size(1), W.size(0), W.size(1)};
  check_labels(op, y, device);
  check_shape(op, "y", y, {s.B});
  check_tensor(op, "weight", weight, at::kFloat, {s.T, s.B}, device);
  if (noise_coef.has_value()) {
    check_tensor(op, "noise_coef", *noise_coef, at::kFloat, {s.T, s.B}, device);
    TORCH_CHECK(seed.has_value(), op, ": seed: required when noise_coef is given");
  }
  if (seed.has_value()) check_seed(op, *seed, device);
  return s;
}

RowSizes check_latent_update(const char* op, const at::Tensor& logits, const at::Tensor& W, const at::Tensor& z,
                             const at::Tensor& p, const at::Tensor& q, const at::Tensor& r, const at::Tensor& seed) {
  const auto device = z.device();
  check_embedding(op, W, device);
  check_device_and_layout(op, "z", z, device);
  check_activation_dtype(op, "z", z);
  TORCH_CHECK(z.dim() == 2 && z.size(1) == W.size(1), op, ": z: expected shape [N, ", W.size(1),
              "] (D = W.shape[1]), got ", z.sizes());
  const RowSizes s{z.size(0), W.size(0), W.size(1)};
  check_device_and_layout(op, "logits", logits, device);
  check_activation_dtype(op, "logits", logits);
  check_shape(op, "logits", logits, {s.N, s.C});
  check_tensor(op, "p", p, at::kFloat, {s.N}, device);
  check_tensor(op, "q", q, at::kFloat, {s.N}, device);
  check_tensor(op, "r", r, at::kFloat, {s.N}, device);
  check_seed(op, seed, device);
  return s;
}

// ================================================================================== CPU kernels

namespace {

// Labels index rows of W: check them here (the CUDA kernels assert on the device instead).
void check_label_values(const char* op, const at::Tensor& y, int64_t C) {
  const int64_t* labels = y.data_ptr<int64_t>();
  for (int64_t i = 0; i < y.numel(); ++i) {
    TORCH_CHECK(labels[i] >= 0 && labels[i] < C, op, ": y: labels must lie in [0, ", C, "), got ", labels[i]);
  }
}

PhiloxKey key_of(const at::Tensor& seed) { return philox_key(seed.data_ptr<int64_t>()[0]); }

// out[j] = eps(key, first + j) for j < n. Philox runs over a block of consecutive counters into
// two uniform buffers (straight-line integer code that GCC vectorises), then Box-Muller. The
// widest vectors (AVX-512, AVX2) are picked at load time where GCC can clone the function.
NOPROP_CPU_DISPATCH void fill_normals(PhiloxKey key, uint64_t first, int64_t n, float* out) {
  constexpr int64_t kBlock = 256;
  float u1[kBlock], u2[kBlock];
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t m = std::min(kBlock, n - start);
    const uint64_t counter = first + static_cast<uint64_t>(start);
    for (int64_t j = 0; j < m; ++j) {
      const PhiloxWords w = philox_words(counter + static_cast<uint64_t>(j), key);
      u1[j] = uniform_from_word(w.w0);
      u2[j] = uniform_from_word(w.w1);
    }
    for (int64_t j = 0; j < m; ++j) out[start + j] = box_muller(u1[j], u2[j]);
  }
}

float dot(const float* x, const float* y, int64_t n) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t k = 0; k < n; ++k) s += x[k] * y[k];
  return s;
}

// probs[c] = readout(logits)[c]: softmax over the row, or the logits themselves.
void readout_row(const float* logits, int64_t C, bool softmax, float* probs) {
  float row_max = 0.0f, inv_sum = 1.0f;
  if (softmax) {
    row_max = strided_max(logits, static_cast<int>(C), 0, 1);
    inv_sum = 1.0f / strided_sum_exp(logits, static_cast<int>(C), row_max, 0, 1);
  }
  for (int64_t c = 0; c < C; ++c) probs[c] = readout_weight(logits[c], row_max, inv_sum, softmax);
}

// u_hat[d] = sum_c probs[c] W[c, d].
void mix_embeddings(const float* probs, const float* W, int64_t C, int64_t D, float* u_hat) {
  std::fill(u_hat, u_hat + D, 0.0f);
  for (int64_t c = 0; c < C; ++c) {
    const float p = probs[c];
    const float* w = W + c * D;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) u_hat[d] += p * w[d];
  }
}

// glogits[c] = readout_backward(probs[c], dprobs[c]) with dprobs[c] = <G, W[c]>, the gradient of the
// logits from G = d loss / d u_hat of one row (u_hat = probs @ W); dprobs is scratch of C floats.
void readout_grad_row(const float* probs, const float* G, const float* W, int64_t C, int64_t D, bool softmax,
                      float* dprobs, float* glogits) {
  float prob_dot_dprob = 0.0f;
  for (int64_t c = 0; c < C; ++c) {
    dprobs[c] = dot(G, W + c * D, D);
    prob_dot_dprob += probs[c] * dprobs[c];
  }
  for (int64_t c = 0; c < C; ++c) glogits[c] = readout_backward(probs[c], dprobs[c], prob_dot_dprob, softmax);
}

// acc[c, :] += coef[c] G for every class c: one row's share of a W gradient sum_rows coef^T G.
void add_outer_row(const float* coef, const float* G, int64_t C, int64_t D, float* acc) {
  for (int64_t c = 0; c < C; ++c) {
    const float k = coef[c];
    float* acc_c = acc + c * D;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) acc_c[d] += k * G[d];
  }
}

// Rows [0, N) in contiguous chunks, at most one per thread; with `sum` defined ([C, D] float32),
// each chunk gets a zeroed partial of sum's size, and the partials are added into `sum` in chunk
// order. body(begin, end, partial) handles rows [begin, end); partial is null without `sum`.
template <typename Body>
void for_row_chunks(int64_t N, int64_t rows_per_task, const at::Tensor& sum, const Body& body) {
  if (N == 0) return;
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), N / rows_per_task));
  const int64_t size = sum.defined() ? sum.numel() : 0;
  std::vector<float> partials(static_cast<size_t>(chunks * size), 0.0f);
  at::parallel_for(0, chunks, 1, [&](int64_t first, int64_t last) {
    for (int64_t chunk = first; chunk < last; ++chunk) {
      body(chunk * N / chunks, (chunk + 1) * N / chunks, size ? partials.data() + chunk * size : nullptr);
    }
  });
  if (!size) return;
  float* out = sum.data_ptr<float>();
  std::copy(partials.begin(), partials.begin() + size, out);
  for (int64_t chunk = 1; chunk < chunks; ++chunk) {
    const float* part = partials.data() + chunk * size;
    for (int64_t k = 0; k < size; ++k) out[k] += part[k];
  }
}

// Rows per parallel task: about 16k elements of work.
int64_t rows_per_task(int64_t row_length) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, row_length)); }

at::Tensor normal_cpu(const at::Tensor& seed, at::IntArrayRef shape, int64_t offset) {
  check_seed("normal", seed, seed.device());
  TORCH_CHECK(offset >= 0, "normal: offset: expected an int >= 0, got ", offset);
  at::Tensor out = at::empty(shape, seed.options().dtype(at::kFloat));
  const PhiloxKey key = key_of(seed);
  float* data = out.data_ptr<float>();
  at::parallel_for(0, out.numel(), 16384, [&](int64_t first, int64_t last) {
    fill_normals(key, static_cast<uint64_t>(offset) + static_cast<uint64_t>(first), last - first, data + first);
  });
  return out;
}

// z[t, i, :] = a[t, i] W[y_i] + b[t, i] eps[t, i, :]; eps is drawn into z's row, then combined.
at::Tensor noised_latents_forward_cpu(const at::Tensor& W, const at::Tensor& y, const at::Tensor& a,
                                      const at::Tensor& b, const at::Tensor& seed) {
  const char* op = "noised_latents_forward";
  const BlockSizes s = check_noised_latents(op, W, y, a, b, seed);
  check_label_values(op, y, s.C);
  at::Tensor z = at::empty({s.T, s.B, s.D}, W.options());
  const PhiloxKey key = key_of(seed);
  const float *w = W.data_ptr<float>(), *pa = a.data_ptr<float>(), *pb = b.data_ptr<float>();
  const int64_t* labels = y.data_ptr<int64_t>();
  float* out = z.data_ptr<float>();
  const int64_t D = s.D;
  at::parallel_for(0, s.T * s.B, rows_per_task(D), [&](int64_t first, int64_t last) {
    for (int64_t row = first; row < last; ++row) {
      float* z_row = out + row * D;
      const float* w_y = w + labels[row % s.B] * D;
      fill_normals(key, static_cast<uint64_t>(row * D), D, z_row);
      for (int64_t d = 0; d < D; ++d) z_row[d] = noised_latent(pa[row], w_y[d], pb[row], z_row[d]);
    }
  });
  return z;
}

// gW[c] = sum_{t, i: y_i = c} a[t, i] grad_z[t, i];  ga[t, i] = <grad_z[t, i], W[y_i]>;
// gb[t, i] = <grad_z[t, i], eps[t, i]> with eps regenerated. Unneeded gradients come back empty.
std::tuple<at::Tensor, at::Tensor, at::Tensor> noised_latents_backward_cpu(
    const at::Tensor& grad_z, const at::Tensor& W, const at::Tensor& y, const at::Tensor& a, const at::Tensor& b,
    const at::Tensor& seed, bool needs_W, bool needs_a, bool needs_b) {
  const char* op = "noised_latents_backward";
  const BlockSizes s = check_noised_latents(op, W, y, a, b, seed);
  check_tensor(op, "grad_z", grad_z, W.scalar_type(), {s.T, s.B, s.D}, W.device());
  check_label_values(op, y, s.C);
  at::Tensor gW = needs_W ? at::empty_like(W) : W.new_empty({0});
  at::Tensor ga = needs_a ? at::empty_like(a) : a.new_empty({0});
  at::Tensor gb = needs_b ? at::empty_like(b) : b.new_empty({0});
  const PhiloxKey key = key_of(seed);
  const float *g = grad_z.data_ptr<float>(), *w = W.data_ptr<float>(), *pa = a.data_ptr<float>();
  const int64_t* labels = y.data_ptr<int64_t>();
  float* out_a = needs_a ? ga.data_ptr<float>() : nullptr;
  float* out_b = needs_b ? gb.data_ptr<float>() : nullptr;
  const int64_t D = s.D;
  const at::Tensor gW_sum = needs_W ? gW : at::Tensor();
  for_row_chunks(s.T * s.B, rows_per_task(D), gW_sum, [&](int64_t first, int64_t last, float* gW_part) {
    std::vector<float> eps(needs_b ? D : 0);
    for (int64_t row = first; row < last; ++row) {
      const float* g_row = g + row * D;
      const int64_t label = labels[row % s.B];
      if (needs_a) out_a[row] = dot(g_row, w + label * D, D);
      if (needs_b) {
        fill_normals(key, static_cast<uint64_t>(row * D), D, eps.data());
        out_b[row] = dot(g_row, eps.data(), D);
      }
      if (gW_part) {
        float* acc = gW_part + label * D;
        const float coef = pa[row];
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) acc[d] += coef * g_row[d];
      }
    }
  });
  return {gW, ga, gb};
}

// Scratch rows of one chunk of the denoising-loss and latent-update loops.
struct RowScratch {
  std::vector<float> probs, u_hat, eps;
  RowScratch(int64_t C, int64_t D, bool noisy) : probs(C), u_hat(D), eps(noisy ? D : 0) {}
};

// row_sq_error[t, i] = ||readout(logits[t, i]) @ W - W[y_i] - c[t, i] eps[t, i]||^2 and
// loss = sum weight * row_sq_error / B (accumulated in float64, in row order).
std::tuple<at::Tensor, at::Tensor> denoising_loss_forward_cpu(const at::Tensor& logits, const at::Tensor& W,
                                                              const at::Tensor& y, const at::Tensor& weight,
                                                              const std::optional<at::Tensor>& noise_coef,
                                                              const std::optional<at::Tensor>& seed, bool softmax) {
  const char* op = "denoising_loss_forward";
  const BlockSizes s = check_denoising_loss(op, logits, W, y, weight, noise_coef, seed);
  check_label_values(op, y, s.C);
  at::Tensor row_sq_error = at::empty({s.T, s.B}, weight.options());
  const bool noisy = noise_coef.has_value();
  const PhiloxKey key = noisy ? key_of(*seed) : PhiloxKey{0, 0};
  const float *x = logits.data_ptr<float>(), *w = W.data_ptr<float>();
  const float* nc = noisy ? noise_coef->data_ptr<float>() : nullptr;
  const int64_t* labels = y.data_ptr<int64_t>();
  float* err = row_sq_error.data_ptr<float>();
  const int64_t C = s.C, D = s.D;
  at::parallel_for(0, s.T * s.B, rows_per_task(C * D), [&](int64_t first, int64_t last) {
    RowScratch scratch(C, D, noisy);
    for (int64_t row = first; row < last; ++row) {
      readout_row(x + row * C, C, softmax, scratch.probs.data());
      mix_embeddings(scratch.probs.data(), w, C, D, scratch.u_hat.data());
      if (noisy) fill_normals(key, static_cast<uint64_t>(row * D), D, scratch.eps.data());
      const float* u = scratch.u_hat.data();
      const float* w_y = w + labels[row % s.B] * D;
      const float c = noisy ? nc[row] : 0.0f;
      const float* eps = noisy ? scratch.eps.data() : nullptr;
      float sq = 0.0f;
#pragma omp simd reduction(+ : sq)
      for (int64_t d = 0; d < D; ++d) {
        const float r = denoising_residual(u[d], w_y[d], c, eps ? eps[d] : 0.0f);
        sq += r * r;
      }
      err[row] = sq;
    }
  });
  const float* wt = weight.data_ptr<float>();
  double total = 0.0;
  for (int64_t row = 0; row < s.T * s.B; ++row) total += static_cast<double>(wt[row]) * err[row];
  at::Tensor loss = at::scalar_tensor(static_cast<float>(total / static_cast<double>(s.B)), weight.options());
  return {loss, row_sq_error};
}

// G = 2 weight (u_hat - target) / B * grad_loss;  dprobs = G W^T;  glogits = readout_backward(dprobs);
// gW = sum_rows (probs - onehot(y))^T G.
std::tuple<at::Tensor, at::Tensor> denoising_loss_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& logits,
                                                               const at::Tensor& W, const at::Tensor& y,
                                                               const at::Tensor& weight,
                                                               const std::optional<at::Tensor>& noise_coef,
                                                               const std::optional<at::Tensor>& seed, bool softmax,
                                                               bool needs_W) {
  const char* op = "denoising_loss_backward";
  const BlockSizes s = check_denoising_loss(op, logits, W, y, weight, noise_coef, seed);
  check_tensor(op, "grad_loss", grad_loss, at::kFloat, {}, logits.device());
  check_label_values(op, y, s.C);
  at::Tensor glogits = at::empty_like(logits);
  at::Tensor gW = needs_W ? at::empty_like(W) : W.new_empty({0});
  const bool noisy = noise_coef.has_value();
  const PhiloxKey key = noisy ? key_of(*seed) : PhiloxKey{0, 0};
  const float upstream = grad_loss.item<float>();
  const float *x = logits.data_ptr<float>(), *w = W.data_ptr<float>(), *wt = weight.data_ptr<float>();
  const float* nc = noisy ? noise_coef->data_ptr<float>() : nullptr;
  const int64_t* labels = y.data_ptr<int64_t>();
  float* gx = glogits.data_ptr<float>();
  const int64_t C = s.C, D = s.D;
  const at::Tensor gW_sum = needs_W ? gW : at::Tensor();
  for_row_chunks(s.T * s.B, rows_per_task(C * D), gW_sum, [&](int64_t first, int64_t last, float* gW_part) {
    RowScratch scratch(C, D, noisy);
    std::vector<float> dprobs(C);
    float* probs = scratch.probs.data();
    float* G = scratch.u_hat.data();  // u_hat becomes the gradient row in place
    for (int64_t row = first; row < last; ++row) {
      readout_row(x + row * C, C, softmax, probs);
      mix_embeddings(probs, w, C, D, G);
      if (noisy) fill_normals(key, static_cast<uint64_t>(row * D), D, scratch.eps.data());
      const int64_t label = labels[row % s.B];
      const float* w_y = w + label * D;
      const float c = noisy ? nc[row] : 0.0f;
      const float* eps = noisy ? scratch.eps.data() : nullptr;
      const float scale = denoising_grad_scale(wt[row], upstream, s.B);
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) G[d] = scale * denoising_residual(G[d], w_y[d], c, eps ? eps[d] : 0.0f);
      readout_grad_row(probs, G, w, C, D, softmax, dprobs.data(), gx + row * C);
      if (!gW_part) continue;
      probs[label] -= 1.0f;  // the W-gradient coefficients probs - onehot(y)
      add_outer_row(probs, G, C, D, gW_part);
    }
  });
  return {glogits, gW};
}

// z_new[n] = p[n] readout(logits[n]) @ W + q[n] z[n] + r[n] eps[n]; eps is not drawn where r[n] = 0.
at::Tensor latent_update_cpu(const at::Tensor& logits, const at::Tensor& W, const at::Tensor& z, const at::Tensor& p,
                             const at::Tensor& q, const at::Tensor& r, const at::Tensor& seed, bool softmax) {
  const RowSizes s = check_latent_update("latent_update", logits, W, z, p, q, r, seed);
  at::Tensor z_new = at::empty_like(z);
  const PhiloxKey key = key_of(seed);
  const float *x = logits.data_ptr<float>(), *w = W.data_ptr<float>(), *zin = z.data_ptr<float>();
  const float *pp = p.data_ptr<float>(), *pq = q.data_ptr<float>(), *pr = r.data_ptr<float>();
  float* out = z_new.data_ptr<float>();
  const int64_t C = s.C, D = s.D;
  at::parallel_for(0, s.N, rows_per_task(C * D), [&](int64_t first, int64_t last) {
    RowScratch scratch(C, D, true);
    for (int64_t row = first; row < last; ++row) {
      readout_row(x + row * C, C, softmax, scratch.probs.data());
      mix_embeddings(scratch.probs.data(), w, C, D, scratch.u_hat.data());
      const bool noisy = pr[row] != 0.0f;
      if (noisy) fill_normals(key, static_cast<uint64_t>(row * D), D, scratch.eps.data());
      const float *u = scratch.u_hat.data(), *eps = scratch.eps.data(), *z_row = zin + row * D;
      for (int64_t d = 0; d < D; ++d) {
        out[row * D + d] = latent_step(pp[row], u[d], pq[row], z_row[d], pr[row], noisy ? eps[d] : 0.0f);
      }
    }
  });
  return z_new;
}

// From g = grad [N, D]: gz = q g; gp[n] = <g[n], u_hat[n]>, gq[n] = <g[n], z[n]>, gr[n] = <g[n], eps[n]>
// (eps regenerated); G = p g = d loss / d u_hat, dprobs = G W^T, glogits = readout_backward(dprobs);
// gW = sum_rows probs^T G. Unneeded gradients come back empty.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> latent_update_backward_cpu(
    const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& W, const at::Tensor& z, const at::Tensor& p,
    const at::Tensor& q, const at::Tensor& r, const at::Tensor& seed, bool softmax, bool needs_logits, bool needs_W,
    bool needs_z, bool needs_p, bool needs_q, bool needs_r) {
  const char* op = "latent_update_backward";
  const RowSizes s = check_latent_update(op, logits, W, z, p, q, r, seed);
  check_tensor(op, "grad", grad, z.scalar_type(), {s.N, s.D}, z.device());
  at::Tensor glogits = needs_logits ? at::empty_like(logits) : logits.new_empty({0});
  at::Tensor gW = needs_W ? at::empty_like(W) : W.new_empty({0});
  at::Tensor gz = needs_z ? at::empty_like(z) : z.new_empty({0});
  at::Tensor gp = needs_p ? at::empty_like(p) : p.new_empty({0});
  at::Tensor gq = needs_q ? at::empty_like(q) : q.new_empty({0});
  at::Tensor gr = needs_r ? at::empty_like(r) : r.new_empty({0});
  const PhiloxKey key = key_of(seed);
  const float *g = grad.data_ptr<float>(), *x = logits.data_ptr<float>(), *w = W.data_ptr<float>();
  const float *zin = z.data_ptr<float>(), *pp = p.data_ptr<float>(), *pq = q.data_ptr<float>();
  float* gx = needs_logits ? glogits.data_ptr<float>() : nullptr;
  float* out_z = needs_z ? gz.data_ptr<float>() : nullptr;
  float* out_p = needs_p ? gp.data_ptr<float>() : nullptr;
  float* out_q = needs_q ? gq.data_ptr<float>() : nullptr;
  float* out_r = needs_r ? gr.data_ptr<float>() : nullptr;
  const bool needs_probs = needs_logits || needs_W || needs_p;
  const bool needs_G = needs_logits || needs_W;
  const int64_t C = s.C, D = s.D;
  const at::Tensor gW_sum = needs_W ? gW : at::Tensor();
  for_row_chunks(s.N, rows_per_task(C * D), gW_sum, [&](int64_t first, int64_t last, float* gW_part) {
    RowScratch scratch(C, D, needs_r);
    std::vector<float> G(needs_G ? D : 0), dprobs(needs_logits ? C : 0);
    float* probs = scratch.probs.data();
    for (int64_t row = first; row < last; ++row) {
      const float* g_row = g + row * D;
      if (needs_probs) readout_row(x + row * C, C, softmax, probs);
      if (out_z) {
        for (int64_t d = 0; d < D; ++d) out_z[row * D + d] = latent_step_grad_z(pq[row], g_row[d]);
      }
      if (out_p) {
        mix_embeddings(probs, w, C, D, scratch.u_hat.data());
        out_p[row] = dot(g_row, scratch.u_hat.data(), D);
      }
      if (out_q) out_q[row] = dot(g_row, zin + row * D, D);
      if (out_r) {
        fill_normals(key, static_cast<uint64_t>(row * D), D, scratch.eps.data());
        out_r[row] = dot(g_row, scratch.eps.data(), D);
      }
      if (!needs_G) continue;
      for (int64_t d = 0; d < D; ++d) G[d] = latent_step_grad_u_hat(pp[row], g_row[d]);
      if (gx) readout_grad_row(probs, G.data(), w, C, D, softmax, dprobs.data(), gx + row * C);
      if (gW_part) add_outer_row(probs, G.data(), C, D, gW_part);
    }
  });
  return {glogits, gW, gz, gp, gq, gr};
}

// ---------------------------------------------------------------------------------- conv_epilogue

// Strides of a [B, K, H, W] tensor, in elements.
struct Strides4 {
  int64_t b, k, h, w;
  explicit Strides4(const at::Tensor& t) : b(t.stride(0)), k(t.stride(1)), h(t.stride(2)), w(t.stride(3)) {}
};

// Per-thread scratch of the dropout draws of one pixel: the lane table of the (block, group of four)
// pairs (rebuilt when the pixel's group count changes) and the drawn words.
struct DropoutScratch {
  int64_t groups = -1, blocks = -1;
  std::vector<uint32_t> group_of_lane, block_of_lane, words;

  // Lanes j * groups + g for block j < blocks and group g < groups, padded to kPhiloxLanes.
  void set_lanes(int64_t groups_, int64_t blocks_) {
    if (groups_ == groups && blocks_ == blocks) return;
    groups = groups_, blocks = blocks_;
    const int64_t padded = (groups * blocks + kPhiloxLanes - 1) / kPhiloxLanes * kPhiloxLanes;
    group_of_lane.assign(padded, 0);
    block_of_lane.assign(padded, 0);
    words.resize(4 * padded);
    for (int64_t j = 0; j < blocks; ++j)
      for (int64_t g = 0; g < groups; ++g) {
        group_of_lane[j * groups + g] = static_cast<uint32_t>(g);
        block_of_lane[j * groups + g] = static_cast<uint32_t>(j);
      }
  }
};

// keep[i] = uniform(word[i]) >= p for i < n (one comparison per element; vectorises).
NOPROP_CPU_DISPATCH
void keep_from_words(const uint32_t* word, int64_t n, float p, uint8_t* keep) {
  for (int64_t i = 0; i < n; ++i) keep[i] = uniform_from_word(word[i]) >= p;
}

// The keep flags of elements first .. first + C - 1 of blocks block0 .. block0 + blocks - 1 (one row
// and stream): keep[j * C + i] for element first + i of block block0 + j. Every (block, group of four)
// pair's Philox draw side by side (philox_lanes), then one comparison per element.
void dropout_keep_pixel(PhiloxKey key, uint32_t first, int64_t C, int64_t blocks, uint32_t row, uint32_t block0,
                        uint32_t stream, float p, DropoutScratch& scratch, uint8_t* keep) {
  const uint32_t first_group = first >> 2;
  const int64_t groups = ((static_cast<int64_t>(first) + C - 1) >> 2) - first_group + 1;
  scratch.set_lanes(groups, blocks);
  const int64_t lanes = static_cast<int64_t>(scratch.group_of_lane.size());
  philox_lanes(scratch.group_of_lane.data(), scratch.block_of_lane.data(), first_group, row, block0, stream, key, lanes,
               scratch.words.data());
  const uint32_t lane = first & 3u;
  for (int64_t j = 0; j < blocks; ++j) keep_from_words(scratch.words.data() + 4 * j * groups + lane, C, p, keep + j * C);
}

// The 2x2 window maxima of K channels with unit channel stride (channels-last input), branch-free so
// the loop vectorises: rows r0 and r1, column step sw.
NOPROP_CPU_DISPATCH
void window_max_run(const float* r0, const float* r1, int64_t sw, int64_t K, float* value, uint8_t* index) {
  for (int64_t k = 0; k < K; ++k) {
    const float v[4] = {r0[k], r0[k + sw], r1[k], r1[k + sw]};
    float m = v[0];
    uint8_t at = 0;
    for (int i = 1; i < 4; ++i) {
      const bool better = v[i] > m || v[i] != v[i];
      m = better ? v[i] : m;
      at = better ? static_cast<uint8_t>(i) : at;
    }
    value[k] = m;
    index[k] = at;
  }
}

// y (and argmax) of one output pixel from its maxima and keep flags; unit channel stride vectorises.
NOPROP_CPU_DISPATCH
void store_pixel(const float* value, const uint8_t* keep, const uint8_t* index, float* y, uint8_t* argmax, int64_t at,
                 int64_t stride, int64_t K, bool pooled, float scale) {
  if (stride == 1) {
    for (int64_t k = 0; k < K; ++k) y[at + k] = epilogue_value(value[k], keep[k], scale);
    if (pooled) std::copy(index, index + K, argmax + at);
    return;
  }
  for (int64_t k = 0; k < K; ++k) y[at + k * stride] = epilogue_value(value[k], keep[k], scale);
  if (pooled)
    for (int64_t k = 0; k < K; ++k) argmax[at + k * stride] = index[k];
}

// Per-thread scratch of one output pixel's K channels.
struct PixelScratch {
  std::vector<float> value;
  std::vector<uint8_t> index, keep;
  DropoutScratch dropout;
  explicit PixelScratch(int64_t K) : value(K), index(K), keep(K, 1) {}
};

// One output pixel (b, ho, wo) of every channel: window max, dropout, store. Channels-last input
// (unit channel stride): maxima for all channels at once, then each block's keep flags from one run
// of Philox draws. Any other input: element by element.
void epilogue_pixel(const float* x, const Strides4& xs, float* y, uint8_t* argmax, const Strides4& ys,
                    const EpilogueSizes& s, int64_t b, int64_t ho, int64_t wo, bool pooled, float p, float scale,
                    PhiloxKey key, uint32_t row, uint32_t block_offset, uint32_t stream, PixelScratch& scratch) {
  const int64_t step = pooled ? 2 : 1;
  const float* x_pixel = x + b * xs.b + ho * step * xs.h + wo * step * xs.w;
  const uint32_t first_element = static_cast<uint32_t>((ho * s.Wo + wo) * s.C);
  float* value = scratch.value.data();
  uint8_t *index = scratch.index.data(), *keep = scratch.keep.data();
  if (xs.k == 1 && pooled) {
    window_max_run(x_pixel, x_pixel + xs.h, xs.w, s.K, value, index);
  } else if (xs.k == 1) {
    std::copy(x_pixel, x_pixel + s.K, value);
  } else {
    for (int64_t k = 0; k < s.K; ++k) {
      const WindowMax m = pooled ? window_max(x_pixel + k * xs.k, xs.h, xs.w) : WindowMax{x_pixel[k * xs.k], 0};
      value[k] = m.value;
      index[k] = m.index;
    }
  }
  if (p > 0.0f) dropout_keep_pixel(key, first_element, s.C, s.K / s.C, row, block_offset, stream, p, scratch.dropout, keep);
  store_pixel(value, keep, index, y, argmax, b * ys.b + ho * ys.h + wo * ys.w, ys.k, s.K, pooled, scale);
}

std::tuple<at::Tensor, at::Tensor> conv_epilogue_forward_cpu(const at::Tensor& x, const at::Tensor& seed, double p,
                                                             bool pooled, int64_t blocks, int64_t block_offset,
                                                             int64_t row_offset, int64_t stream,
                                                             bool contiguous_output) {
  const EpilogueSizes s = check_conv_epilogue("conv_epilogue_forward", x, seed, p, pooled, blocks, block_offset,
                                              row_offset, stream);
  at::Tensor y = epilogue_output(x, s, contiguous_output, x.scalar_type());
  at::Tensor argmax = pooled ? at::empty_like(y, y.options().dtype(at::kByte)) : at::empty({0}, y.options().dtype(at::kByte));
  const Strides4 xs(x), ys(y);
  const PhiloxKey key = key_of(seed);
  const float pf = static_cast<float>(p), scale = dropout_scale(p);
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  uint8_t* ap = pooled ? argmax.data_ptr<uint8_t>() : nullptr;
  // one task = one output row (b, ho) of every channel
  at::parallel_for(0, s.B * s.Ho, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, s.Wo * s.K)), [&](int64_t first, int64_t last) {
    PixelScratch scratch(s.K);
    for (int64_t task = first; task < last; ++task) {
      const int64_t b = task / s.Ho, ho = task % s.Ho;
      for (int64_t wo = 0; wo < s.Wo; ++wo)
        epilogue_pixel(xp, xs, yp, ap, ys, s, b, ho, wo, pooled, pf, scale, key, static_cast<uint32_t>(row_offset + b),
                       static_cast<uint32_t>(block_offset), static_cast<uint32_t>(stream), scratch);
    }
  });
  return {y, argmax};
}

// grad_x of one output pixel's K channels: g = grad_y / (1 - p) where y > 0, routed to the argmax of
// each window (zeros elsewhere). Channel loops run at unit stride where the tensors allow it.
NOPROP_CPU_DISPATCH
void epilogue_grad_pixel(const float* gy, const Strides4& gys, const float* y, const uint8_t* argmax, const Strides4& ys,
                         float* gx, const Strides4& gxs, const EpilogueSizes& s, int64_t b, int64_t ho, int64_t wo,
                         bool pooled, float scale, float* g) {
  const float* gy_pixel = gy + b * gys.b + ho * gys.h + wo * gys.w;
  const int64_t y_pixel = b * ys.b + ho * ys.h + wo * ys.w;
  const float* y_at = y + y_pixel;
  if (ys.k == 1 && gys.k == 1) {
    for (int64_t k = 0; k < s.K; ++k) g[k] = y_at[k] > 0.0f ? gy_pixel[k] * scale : 0.0f;
  } else {
    for (int64_t k = 0; k < s.K; ++k) g[k] = y_at[k * ys.k] > 0.0f ? gy_pixel[k * gys.k] * scale : 0.0f;
  }
  if (!pooled) {
    float* out = gx + b * gxs.b + ho * gxs.h + wo * gxs.w;
    if (gxs.k == 1) {
      std::copy(g, g + s.K, out);
    } else {
      for (int64_t k = 0; k < s.K; ++k) out[k * gxs.k] = g[k];
    }
    return;
  }
  float* window = gx + b * gxs.b + 2 * ho * gxs.h + 2 * wo * gxs.w;
  for (int i = 0; i < 4; ++i) {
    float* out = window + (i >> 1) * gxs.h + (i & 1) * gxs.w;
    const uint8_t* at = argmax + y_pixel;
    if (gxs.k == 1 && ys.k == 1) {
      for (int64_t k = 0; k < s.K; ++k) out[k] = at[k] == i ? g[k] : 0.0f;
    } else {
      for (int64_t k = 0; k < s.K; ++k) out[k * gxs.k] = at[k * ys.k] == i ? g[k] : 0.0f;
    }
  }
}

at::Tensor conv_epilogue_backward_cpu(const at::Tensor& grad_y, const at::Tensor& y, const at::Tensor& argmax, double p,
                                      bool pooled, int64_t height, int64_t width, bool channels_last) {
  const EpilogueSizes s = check_conv_epilogue_backward("conv_epilogue_backward", grad_y, y, argmax, p, pooled, height, width);
  at::Tensor grad_x = epilogue_grad_input(y, s, pooled, channels_last);
  const Strides4 gys(grad_y), ys(y), gxs(grad_x);
  const float scale = dropout_scale(p);
  const float *gy = grad_y.data_ptr<float>(), *yp = y.data_ptr<float>();
  const uint8_t* ap = pooled ? argmax.data_ptr<uint8_t>() : nullptr;
  float* gx = grad_x.data_ptr<float>();
  at::parallel_for(0, s.B * s.Ho, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, s.Wo * s.K)), [&](int64_t first, int64_t last) {
    std::vector<float> g(s.K);
    for (int64_t task = first; task < last; ++task) {
      const int64_t b = task / s.Ho, ho = task % s.Ho;
      for (int64_t wo = 0; wo < s.Wo; ++wo)
        epilogue_grad_pixel(gy, gys, yp, ap, ys, gx, gxs, s, b, ho, wo, pooled, scale, g.data());
    }
  });
  return grad_x;
}

// Test hook: the first two Philox words of each counter (int64 in [0, 2**32)), so tests can compare
// the generator bit for bit with noprop.rng.philox.
std::tuple<at::Tensor, at::Tensor> philox_words_cpu(const at::Tensor& seed, const at::Tensor& counter) {
  check_seed("philox_words", seed, counter.device());
  check_tensor("philox_words", "counter", counter, at::kLong, counter.sizes(), counter.device());
  at::Tensor w0 = at::empty_like(counter), w1 = at::empty_like(counter);
  const PhiloxKey key = key_of(seed);
  const int64_t* n = counter.data_ptr<int64_t>();
  int64_t *out0 = w0.data_ptr<int64_t>(), *out1 = w1.data_ptr<int64_t>();
  for (int64_t k = 0; k < counter.numel(); ++k) {
    const PhiloxWords w = philox_words(static_cast<uint64_t>(n[k]), key);
    out0[k] = w.w0;
    out1[k] = w.w1;
  }
  return {w0, w1};
}

}  // namespace

// ================================================================================== registration

TORCH_LIBRARY(noprop_ext, m) {
  m.def("normal(Tensor seed, int[] shape, int offset) -> Tensor");
  m.def("noised_latents_forward(Tensor W, Tensor y, Tensor a, Tensor b, Tensor seed) -> Tensor");
  m.def(
      "noised_latents_backward(Tensor grad_z, Tensor W, Tensor y, Tensor a, Tensor b, Tensor seed, bool needs_W, "
      "bool needs_a, bool needs_b) -> (Tensor, Tensor, Tensor)");
  m.def(
      "denoising_loss_forward(Tensor logits, Tensor W, Tensor y, Tensor weight, Tensor? noise_coef, Tensor? seed, "
      "bool softmax) -> (Tensor, Tensor)");
  m.def(
      "denoising_loss_backward(Tensor grad_loss, Tensor logits, Tensor W, Tensor y, Tensor weight, "
      "Tensor? noise_coef, Tensor? seed, bool softmax, bool needs_W) -> (Tensor, Tensor)");
  m.def(
      "latent_update(Tensor logits, Tensor W, Tensor z, Tensor p, Tensor q, Tensor r, Tensor seed, bool softmax) "
      "-> Tensor");
  m.def(
      "latent_update_backward(Tensor grad, Tensor logits, Tensor W, Tensor z, Tensor p, Tensor q, Tensor r, "
      "Tensor seed, bool softmax, bool needs_logits, bool needs_W, bool needs_z, bool needs_p, bool needs_q, "
      "bool needs_r) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("philox_words(Tensor seed, Tensor counter) -> (Tensor, Tensor)");
  m.def(
      "conv_epilogue_forward(Tensor x, Tensor seed, float p, bool pooled, int blocks, int block_offset, "
      "int row_offset, int stream, bool contiguous_output) -> (Tensor, Tensor)");
  m.def(
      "conv_epilogue_backward(Tensor grad_y, Tensor y, Tensor argmax, float p, bool pooled, int height, int width, "
      "bool channels_last) -> Tensor");
}

TORCH_LIBRARY_IMPL(noprop_ext, CPU, m) {
  m.impl("normal", &normal_cpu);
  m.impl("noised_latents_forward", &noised_latents_forward_cpu);
  m.impl("noised_latents_backward", &noised_latents_backward_cpu);
  m.impl("denoising_loss_forward", &denoising_loss_forward_cpu);
  m.impl("denoising_loss_backward", &denoising_loss_backward_cpu);
  m.impl("latent_update", &latent_update_cpu);
  m.impl("latent_update_backward", &latent_update_backward_cpu);
  m.impl("philox_words", &philox_words_cpu);
  m.impl("conv_epilogue_forward", &conv_epilogue_forward_cpu);
  m.impl("conv_epilogue_backward", &conv_epilogue_backward_cpu);
}

}  // namespace noprop

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "noprop C++/CUDA kernels; the ops are registered as torch.ops.noprop_ext.*";
  m.def(
      "compiled_with_cuda",
      [] {
#ifdef NOPROP_WITH_CUDA
        return true;
#else
        return false;
#endif
      },
      "True if the extension was built with its CUDA kernels.");
  m.def(
      "philox_isa", [] { return noprop::philox_isa_name(noprop::philox_isa()); },
      "The instruction set of the CPU dropout draws (portable, avx2 or avx512).");
  m.def("supported_philox_isas", &noprop::supported_philox_isas,
        "The instruction sets this CPU offers the CPU dropout draws, portable first.");
  m.def("set_philox_isa", &noprop::set_philox_isa, "Make the CPU dropout draws use this instruction set (for tests).");
}
