// Per-element math of the fused ops, shared by the CPU loops (noprop_ops.cpp) and the CUDA kernels
// (noprop_cuda.cu), so the CPU build exercises the exact code the GPU runs.
//
// * The noise contract (noprop/rng.py): eps(seed, k) is the standard normal that Triton's
//   tl.randn(seed, k) returns: Philox 4x32-10 on the counter (lo32(k), hi32(k), 0, 0) with the key
//   (lo32(seed), hi32(seed)); the first two output words become uniforms (int32 x, ~x if x < 0,
//   times 4.6566127342e-10f) and Box-Muller turns them into sqrt(-2 log u1) cos(2 pi u2).
// * Softmax pieces over a strided subset of a row, so a CPU loop (first = 0, step = 1) and a group
//   of GPU lanes (first = lane, step = lanes) reduce the same partial quantities.
// * The element formulas of the three op families.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define NOPROP_HOST_DEVICE __host__ __device__
#define NOPROP_UNROLL _Pragma("unroll")
#else
#define NOPROP_HOST_DEVICE
#define NOPROP_UNROLL _Pragma("GCC unroll 16")
#endif

namespace noprop {

// ------------------------------------------------------------------------------------------ noise

constexpr int kPhiloxRounds = 10;
constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;    // Weyl increments of the key
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;
constexpr uint32_t kPhiloxRoundA = 0xD2511F53u;  // round multipliers
constexpr uint32_t kPhiloxRoundB = 0xCD9E8D57u;
constexpr float kUintToUniform = 4.6566127342e-10f;  // largest scale with INT32_MAX * scale < 1
constexpr float kMinUniform = 1.0e-7f;               // Box-Muller clamp of u1
constexpr float kTwoPi = 6.283185307179586f;

struct PhiloxKey {
  uint32_t k0, k1;
};

struct PhiloxWords {
  uint32_t w0, w1;
};

// Key (lo32(seed), hi32(seed)) of a seed in [0, 2**63).
NOPROP_HOST_DEVICE inline PhiloxKey philox_key(int64_t seed) {
  const uint64_t s = static_cast<uint64_t>(seed);
  return {static_cast<uint32_t>(s), static_cast<uint32_t>(s >> 32)};
}

// High 32 bits of the 64-bit product a * b.
NOPROP_HOST_DEVICE inline uint32_t mul_hi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

struct PhiloxBlock {
  uint32_t w[4];
};

// Philox 4x32-10 on the 128-bit counter (c0, c1, c2, c3). Each round:
//   (c0, c1, c2, c3) <- (hi(B c2) ^ c1 ^ k0, lo(B c2), hi(A c0) ^ c3 ^ k1, lo(A c0)),
//   (k0, k1) += (KEY_A, KEY_B).
// Straight-line integer code, so a host loop over consecutive counters vectorises.
NOPROP_HOST_DEVICE inline PhiloxBlock philox_block(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, PhiloxKey key) {
  uint32_t k0 = key.k0, k1 = key.k1;
  NOPROP_UNROLL
  for (int round = 0; round < kPhiloxRounds; ++round) {
    const uint32_t hi_b = mul_hi32(kPhiloxRoundB, c2), lo_b = kPhiloxRoundB * c2;
    const uint32_t hi_a = mul_hi32(kPhiloxRoundA, c0), lo_a = kPhiloxRoundA * c0;
    c0 = hi_b ^ c1 ^ k0;
    c1 = lo_b;
    c2 = hi_a ^ c3 ^ k1;
    c3 = lo_a;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  return {{c0, c1, c2, c3}};
}

// First two output words of Philox 4x32-10 on the counter (lo32(n), hi32(n), 0, 0).
NOPROP_HOST_DEVICE inline PhiloxWords philox_words(uint64_t n, PhiloxKey key) {
  const PhiloxBlock b = philox_block(static_cast<uint32_t>(n), static_cast<uint32_t>(n >> 32), 0u, 0u, key);
  return {b.w[0], b.w[1]};
}

// Triton's uint_to_uniform_float: read the word as int32 x, fold x < 0 to ~x, scale to [0, 1).
NOPROP_HOST_DEVICE inline float uniform_from_word(uint32_t word) {
  int32_t x = static_cast<int32_t>(word);
  x = x < 0 ? ~x : x;
  return static_cast<float>(x) * kUintToUniform;
}

// Box-Muller, cosine branch: sqrt(-2 log max(u1, 1e-7)) cos(2 pi u2), all in float32.
NOPROP_HOST_DEVICE inline float box_muller(float u1, float u2) {
  u1 = u1 < kMinUniform ? kMinUniform : u1;
  const float radius = sqrtf(-2.0f * logf(u1));
  return radius * cosf(kTwoPi * u2);
}

// eps(seed, n): the contract's standard normal for counter n.
NOPROP_HOST_DEVICE inline float normal_at(PhiloxKey key, uint64_t n) {
  const PhiloxWords w = philox_words(n, key);
  return box_muller(uniform_from_word(w.w0), uniform_from_word(w.w1));
}

// ------------------------------------------------------------------------------------------ dropout

// The dropout contract (noprop/rng.py, dropout_keep): element e = (h W + w) C + c of block `block`'s
// feature map for batch row `row` is kept iff uniform(philox(seed, (e >> 2, row, block, stream))[e & 3])
// >= p. One Philox draw serves four consecutive elements.
NOPROP_HOST_DEVICE inline bool dropout_keep(const PhiloxBlock& draw, uint32_t element, float p) {
  return uniform_from_word(draw.w[element & 3u]) >= p;
}

NOPROP_HOST_DEVICE inline PhiloxBlock dropout_draw(PhiloxKey key, uint32_t element, uint32_t row, uint32_t block,
                                                   uint32_t stream) {
  return philox_block(element >> 2, row, block, stream, key);
}

// Scale of a kept value, 1 / (1 - p) rounded to float32 (0 when p = 1: nothing is kept).
NOPROP_HOST_DEVICE inline float dropout_scale(double p) { return p < 1.0 ? static_cast<float>(1.0 / (1.0 - p)) : 0.0f; }

// The epilogue's output from the (pooled) pre-activation v: dropout(relu(v)). NaN propagates where kept.
NOPROP_HOST_DEVICE inline float epilogue_value(float v, bool keep, float scale) {
  return keep && (v > 0.0f || v != v) ? v * scale : 0.0f;
}

// 2x2 max-pool window starting at `top_left` (row stride sh, column stride sw): the maximum and its
// position 0..3 in row-major order; the first maximum wins a tie and NaN wins, as in PyTorch.
struct WindowMax {
  float value;
  uint8_t index;
};

template <typename T>
NOPROP_HOST_DEVICE inline WindowMax window_max(const T* top_left, int64_t sh, int64_t sw) {
  WindowMax best{static_cast<float>(top_left[0]), 0};
  NOPROP_UNROLL
  for (int i = 1; i < 4; ++i) {
    const float v = static_cast<float>(top_left[(i >> 1) * sh + (i & 1) * sw]);
    if (v > best.value || v != v) best = {v, static_cast<uint8_t>(i)};
  }
  return best;
}

// ------------------------------------------------------------------------------------------ softmax pieces

// max over x[c] for c = first, first + step, ... < C (-inf when the subset is empty).
template <typename T>
NOPROP_HOST_DEVICE inline float strided_max(const T* x, int C, int first, int step) {
  float m = -INFINITY;
  for (int c = first; c < C; c += step) {
    const float v = static_cast<float>(x[c]);
    m = v > m ? v : m;
  }
  return m;
}

// sum of exp(x[c] - row_max) over the same subset.
template <typename T>
NOPROP_HOST_DEVICE inline float strided_sum_exp(const T* x, int C, float row_max, int first, int step) {
  float s = 0.0f;
  for (int c = first; c < C; c += step) s += expf(static_cast<float>(x[c]) - row_max);
  return s;
}

// Read-out weight of one class: softmax exp(x - max) / sum, or the logit itself (linear read-out).
NOPROP_HOST_DEVICE inline float readout_weight(float logit, float row_max, float inv_sum, bool softmax) {
  return softmax ? expf(logit - row_max) * inv_sum : logit;
}

// d loss / d logit_c from d loss / d prob_c: softmax p_c (dp_c - <p, dp>), linear dp_c.
NOPROP_HOST_DEVICE inline float readout_backward(float prob, float dprob, float prob_dot_dprob, bool softmax) {
  return softmax ? prob * (dprob - prob_dot_dprob) : dprob;
}

// ------------------------------------------------------------------------------------------ op formulas

// noised latents: z = a W[y] + b eps.
NOPROP_HOST_DEVICE inline float noised_latent(float a, float w_y, float b, float eps) { return a * w_y + b * eps; }

// denoising loss: u_hat - target with target = W[y] + c eps (c = 0 without noise).
NOPROP_HOST_DEVICE inline float denoising_residual(float u_hat, float w_y, float noise_coef, float eps) {
  return u_hat - (w_y + noise_coef * eps);
}

// d loss / d u_hat = grad_scale * residual with grad_scale = 2 weight grad_loss / B.
NOPROP_HOST_DEVICE inline float denoising_grad_scale(float weight, float grad_loss, int64_t batch) {
  return 2.0f * weight * grad_loss / static_cast<float>(batch);
}

// latent update: z_new = p u_hat + q z + r eps.
NOPROP_HOST_DEVICE inline float latent_step(float p, float u_hat, float q, float z, float r, float eps) {
  return p * u_hat + q * z + r * eps;
}

// latent update backward, from one element g of d loss / d z_new: d z = q g and d u_hat = p g (whence
// d probs = (p g) W^T and the W gradient probs^T (p g)); the coefficient gradients are the row sums
// of g u_hat (p), g z (q) and g eps (r).
NOPROP_HOST_DEVICE inline float latent_step_grad_z(float q, float grad) { return q * grad; }

NOPROP_HOST_DEVICE inline float latent_step_grad_u_hat(float p, float grad) { return p * grad; }

}  // namespace noprop
