// Argument checks shared by the CPU (noprop_ops.cpp) and CUDA (noprop_cuda.cu) implementations of
// the noprop_ext ops. Each check raises a c10::Error (RuntimeError in Python) that names the op,
// the argument and what was expected; each returns the sizes the kernels need.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace noprop {

// Sizes of the training ops: T blocks, B examples, C classes, D embedding dimensions.
struct BlockSizes {
  int64_t T, B, C, D;
};

// Sizes of latent_update: N rows, C classes, D embedding dimensions.
struct RowSizes {
  int64_t N, C, D;
};

// seed: int64 tensor with one element on `device`.
void check_seed(const char* op, const at::Tensor& seed, at::Device device);

// Dtypes: W, logits and z are float32, and on CUDA also float16 or bfloat16 (the kernels compute in
// float32); coefficients (a, b, weight, noise_coef, p, q, r) are float32; labels y are int64.

// noised_latents_forward / _backward: W [C, D], y [B], a, b [T, B].
BlockSizes check_noised_latents(const char* op, const at::Tensor& W, const at::Tensor& y, const at::Tensor& a,
                                const at::Tensor& b, const at::Tensor& seed);

// denoising_loss_forward / _backward: logits [T, B, C], W [C, D], y [B], weight [T, B], noise_coef
// [T, B] or None; seed is required when noise_coef is given.
BlockSizes check_denoising_loss(const char* op, const at::Tensor& logits, const at::Tensor& W, const at::Tensor& y,
                                const at::Tensor& weight, const std::optional<at::Tensor>& noise_coef,
                                const std::optional<at::Tensor>& seed);

// latent_update and latent_update_backward: logits [N, C], W [C, D], z [N, D], p, q, r [N] (the
// backward also checks its upstream gradient grad [N, D], in z's dtype, with check_tensor).
RowSizes check_latent_update(const char* op, const at::Tensor& logits, const at::Tensor& W, const at::Tensor& z,
                             const at::Tensor& p, const at::Tensor& q, const at::Tensor& r, const at::Tensor& seed);

// Sizes of conv_epilogue: x [B, K, H, W] holds `blocks` blocks of C = K / blocks channels; the output
// is [B, K, Ho, Wo] (Ho, Wo = H / 2, W / 2 when pooled).
struct EpilogueSizes {
  int64_t B, K, H, W, Ho, Wo, C;
};

// conv_epilogue_forward: x contiguous or channels-last (float32; on CUDA also 16-bit), p in [0, 1],
// counts that fit the dropout contract's 32-bit counter words.
EpilogueSizes check_conv_epilogue(const char* op, const at::Tensor& x, const at::Tensor& seed, double p, bool pooled,
                                  int64_t blocks, int64_t block_offset, int64_t row_offset, int64_t stream);

// conv_epilogue_backward: grad_y and y [B, K, Ho, Wo] of one dtype (any strides for grad_y; y as the
// forward wrote it), argmax uint8 like y when pooled; returns the sizes with H, W = height, width.
EpilogueSizes check_conv_epilogue_backward(const char* op, const at::Tensor& grad_y, const at::Tensor& y,
                                           const at::Tensor& argmax, double p, bool pooled, int64_t height,
                                           int64_t width);

// The output of the forward ([B, K, Ho, Wo], x's memory format unless contiguous_output) and of the
// backward ([B, K, H, W], channels-last or contiguous; zero-filled where no window reaches).
at::Tensor epilogue_output(const at::Tensor& x, const EpilogueSizes& s, bool contiguous_output, at::ScalarType dtype);
at::Tensor epilogue_grad_input(const at::Tensor& y, const EpilogueSizes& s, bool pooled, bool channels_last);

// `tensor` is contiguous, has `dtype` and `shape` and lives on `device`.
void check_tensor(const char* op, const char* name, const at::Tensor& tensor, at::ScalarType dtype,
                  at::IntArrayRef shape, at::Device device);

}  // namespace noprop
