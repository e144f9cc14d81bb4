// CUDA kernels of the noprop_ext ops, registered for the CUDA dispatch key.
//
// Every kernel runs the per-element math of noprop_math.h (the CPU loops run the same functions),
// reads the seed and the upstream loss gradient from device memory (no host sync, so a training
// step can be captured in a CUDA graph), launches on the current stream and accumulates in float32
// whatever the dtype of logits and latents.
//
// Two layouts:
// * Element kernels (normal, noised_latents_forward): each thread produces 4 consecutive elements
//   of the flat output (one 16-byte store); Philox dominates their cost.
// * Row kernels (the backward passes, the loss, latent_update): a group of G lanes (a power of two
//   <= 32, so a group never straddles a warp) owns one row of D embedding columns, split into
//   quads of 4 consecutive columns (vector loads); G is chosen from D so few lanes idle, and a
//   block holds a tile of blockDim / G rows. Row reductions are warp shuffles inside the group;
//   blocks loop over tiles (persistent grid). Per-row class weights live in shared memory.
//   The W gradients are outer-product sums over rows, sum_r coef[r, c] G[r, d]: each tile stages
//   its rows' G in shared memory, every (c, quad) output is owned by one thread (no shared-memory
//   atomics), partial sums stay in shared memory across tiles, and each block ends with one
//   atomicAdd per W element.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/detail/IntegerDivider.cuh>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <initializer_list>
#include <type_traits>

#include "noprop_math.h"
#include "noprop_ops.h"

// float32, float16 and bfloat16: the dtypes of logits and latents on CUDA (scalar_t in __VA_ARGS__).
#define NOPROP_DISPATCH_ACTIVATIONS(TYPE, NAME, ...)                                                   \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)                             \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)                          \
                                         AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

namespace noprop {
namespace {

using at::cuda::detail::IntDivider;

constexpr int kMaxThreads = 256;
constexpr int kElementsPerThread = 4;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr size_t kDefaultSmemLimit = 48 * 1024;

// ================================================================================== device helpers

// Four consecutive columns 4q .. 4q + 3 of a row, in float32.
struct Quad {
  float v[4];
};

template <typename T>
struct alignas(4 * sizeof(T)) Pack4 {
  T v[4];
};

// Columns 4q .. 4q + 3 of `row` (zeros past D). `vec`: D % 4 == 0 and rows are aligned, so the
// quad is one vector load.
template <typename T>
__device__ __forceinline__ Quad load_quad(const T* row, int q, int D, bool vec) {
  Quad out;
  const int d0 = 4 * q;
  if (vec) {
    const Pack4<T> pack = *reinterpret_cast<const Pack4<T>*>(row + d0);
#pragma unroll
    for (int j = 0; j < 4; ++j) out.v[j] = static_cast<float>(pack.v[j]);
  } else {
#pragma unroll
    for (int j = 0; j < 4; ++j) out.v[j] = d0 + j < D ? static_cast<float>(row[d0 + j]) : 0.0f;
  }
  return out;
}

template <typename T>
__device__ __forceinline__ void store_quad(T* row, int q, int D, bool vec, const Quad& x) {
  const int d0 = 4 * q;
  if (vec) {
    Pack4<T> pack;
#pragma unroll
    for (int j = 0; j < 4; ++j) pack.v[j] = static_cast<T>(x.v[j]);
    *reinterpret_cast<Pack4<T>*>(row + d0) = pack;
  } else {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if (d0 + j < D) row[d0 + j] = static_cast<T>(x.v[j]);
    }
  }
}

__device__ __forceinline__ float4 to_float4(const Quad& x) { return make_float4(x.v[0], x.v[1], x.v[2], x.v[3]); }

__device__ __forceinline__ float dot4(const Quad& x, const Quad& y) {
  return x.v[0] * y.v[0] + x.v[1] * y.v[1] + x.v[2] * y.v[2] + x.v[3] * y.v[3];
}

// eps(key, base + d) for the columns d of quad q (0 past D); `base` is the row's first counter.
__device__ __forceinline__ Quad noise_quad(PhiloxKey key, uint64_t base, int q, int D) {
  Quad eps;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int d = 4 * q + j;
    eps.v[j] = d < D ? normal_at(key, base + static_cast<uint64_t>(d)) : 0.0f;
  }
  return eps;
}

// Quad q of the read-out embedding u_hat = sum_c probs[c] W[c, :].
__device__ __forceinline__ Quad mix_quad(const float* probs, const float* W, int C, int D, int q, bool vec) {
  Quad u{};
  for (int c = 0; c < C; ++c) {
    const float p = probs[c];
    const Quad w = load_quad(W + static_cast<int64_t>(c) * D, q, D, vec);
#pragma unroll
    for (int j = 0; j < 4; ++j) u.v[j] += p * w.v[j];
  }
  return u;
}

// Sum / max over the aligned group of `lanes` lanes (a power of two); all 32 lanes must call it.
__device__ __forceinline__ float group_sum(float v, int lanes) {
  for (int offset = lanes >> 1; offset > 0; offset >>= 1) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

__device__ __forceinline__ float group_max(float v, int lanes) {
  for (int offset = lanes >> 1; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, offset));
  return v;
}

// Sum over the block, valid in thread 0; every thread of the block must call it.
__device__ float block_sum(float v) {
  __shared__ float warp_sums[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
  v = group_sum(v, 32);
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) v = group_sum(lane < warps ? warp_sums[lane] : 0.0f, 32);
  return v;
}

// *out = (sum over blocks of block_value) / divisor, in a fixed order: every block stores its
// value, and the last block to finish (counted in *done, zero on entry) adds them up.
__device__ void grid_sum(float block_value, float divisor, float* partials, unsigned* done, float* out) {
  __shared__ bool last_block;
  if (threadIdx.x == 0) {
    partials[blockIdx.x] = block_value;
    __threadfence();
    last_block = atomicAdd(done, 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (!last_block) return;
  __threadfence();
  float v = 0.0f;
  for (unsigned k = threadIdx.x; k < gridDim.x; k += blockDim.x) v += __ldcg(partials + k);
  v = block_sum(v);
  if (threadIdx.x == 0) *out = v / divisor;
}

// The thread's place in the row layout: lane `lane` of the `lanes` lanes of row slot `slot`; a
// tile holds `rows` rows.
struct RowGroup {
  int lane, lanes, slot, rows;
  __device__ explicit RowGroup(int lanes_log2)
      : lane(threadIdx.x & ((1 << lanes_log2) - 1)),
        lanes(1 << lanes_log2),
        slot(threadIdx.x >> lanes_log2),
        rows(blockDim.x >> lanes_log2) {}
};

// probs[c] = readout(logits)[c] for the group's lanes' classes c = lane, lane + lanes, ...; the
// caller __syncwarp()s before reading other lanes' entries. All lanes call it; inactive rows
// (past the end) read and write nothing.
template <typename T>
__device__ void readout_row(const T* logits, int C, bool softmax, bool active, const RowGroup& g, float* probs) {
  float row_max = 0.0f, inv_sum = 1.0f;
  if (softmax) {
    row_max = group_max(active ? strided_max(logits, C, g.lane, g.lanes) : 0.0f, g.lanes);
    inv_sum = 1.0f / group_sum(active ? strided_sum_exp(logits, C, row_max, g.lane, g.lanes) : 1.0f, g.lanes);
  }
  if (!active) return;
  for (int c = g.lane; c < C; c += g.lanes) {
    probs[c] = readout_weight(static_cast<float>(logits[c]), row_max, inv_sum, softmax);
  }
}

// Rows in tile `tile` of `rows` rows (fewer in the last tile).
__device__ __forceinline__ int tile_rows(int64_t N, int64_t tile, int rows) {
  const int64_t left = N - tile * rows;
  return left < rows ? static_cast<int>(left) : rows;
}

__device__ __forceinline__ int64_t checked_label(const int64_t* y, int64_t i, int C) {
  const int64_t label = y[i];
  CUDA_KERNEL_ASSERT(label >= 0 && label < C && "y: labels must lie in [0, C)");
  return label;
}

// ---------------------------------------------------------------------------- W-gradient accumulation

// Where the outer-product sums of a row kernel go: partial sums in shared memory (`slices` per
// output, kept across tiles; `acc`, which the kernel points into its shared memory) or, when they
// do not fit (`in_shared` false, `acc` null), straight into gW with atomics.
struct OuterSum {
  float* gW;    // [C, D] in global memory, zeroed before the launch; null: no W gradient
  float4* acc;  // [slices][C * quads]
  int C, D, quads, slices;
  bool vec, in_shared;
};

__device__ __forceinline__ void atomic_add_quad(float* row, int q, int D, bool vec, float4 x) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (vec) {
    atomicAdd(reinterpret_cast<float4*>(row) + q, x);
    return;
  }
#endif
  const float v[4] = {x.x, x.y, x.z, x.w};
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    if (4 * q + j < D) atomicAdd(row + 4 * q + j, v[j]);
  }
}

__device__ __forceinline__ void zero_outer_sum(const OuterSum& s) {
  if (!s.acc) return;
  for (int k = threadIdx.x; k < s.slices * s.C * s.quads; k += blockDim.x) s.acc[k] = make_float4(0.f, 0.f, 0.f, 0.f);
}

// Adds sum over the tile's rows r of coef(r, c) G[r, quad q] to output (c, q), for every (c, q):
// thread `item` owns output item % (C * quads) for the rows of slice item / (C * quads).
// Call between __syncthreads() (G and coef complete, and not yet overwritten).
template <typename Coef>
__device__ void accumulate_outer_sum(const OuterSum& s, const Coef& coef, const float4* G, int rows) {
  const int outputs = s.C * s.quads;
  for (int item = threadIdx.x; item < outputs * s.slices; item += blockDim.x) {
    const int output = item % outputs, slice = item / outputs;
    const int c = output / s.quads, q = output % s.quads;
    float4 sum = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int r = slice; r < rows; r += s.slices) {
      const float k = coef(r, c);
      if (k == 0.0f) continue;
      const float4 g = G[r * s.quads + q];
      sum.x += k * g.x;
      sum.y += k * g.y;
      sum.z += k * g.z;
      sum.w += k * g.w;
    }
    if (s.acc) {
      float4& a = s.acc[item];
      a.x += sum.x;
      a.y += sum.y;
      a.z += sum.z;
      a.w += sum.w;
    } else if (sum.x != 0.f || sum.y != 0.f || sum.z != 0.f || sum.w != 0.f) {
      // a one-hot coefficient leaves most (c, q) at zero: skip their atomics (NaN still goes through)
      atomic_add_quad(s.gW + static_cast<int64_t>(c) * s.D, q, s.D, s.vec, sum);
    }
  }
}

// End of the kernel: add the block's shared-memory partial sums to gW, one atomic per element.
__device__ void flush_outer_sum(const OuterSum& s) {
  if (!s.acc) return;
  __syncthreads();
  const int outputs = s.C * s.quads;
  for (int output = threadIdx.x; output < outputs; output += blockDim.x) {
    float4 sum = s.acc[output];
    for (int slice = 1; slice < s.slices; ++slice) {
      const float4 a = s.acc[slice * outputs + output];
      sum.x += a.x;
      sum.y += a.y;
      sum.z += a.z;
      sum.w += a.w;
    }
    atomic_add_quad(s.gW + static_cast<int64_t>(output / s.quads) * s.D, output % s.quads, s.D, s.vec, sum);
  }
}

// coef(r, c) = probs[r, c] - [c == y_r], stored per row (denoising loss).
struct DenseCoef {
  const float* values;
  int stride;
  __device__ float operator()(int r, int c) const { return values[r * stride + c]; }
};

// coef(r, c) = a_r [c == y_r] (noised latents).
struct OneHotCoef {
  const int* labels;
  const float* scales;
  __device__ float operator()(int r, int c) const { return labels[r] == c ? scales[r] : 0.0f; }
};

// ================================================================================== element kernels

// out[e] = eps(seed, offset + e).
__global__ void __launch_bounds__(kMaxThreads) normal_kernel(const int64_t* seed, uint64_t offset, int64_t numel,
                                                             float* out) {
  const PhiloxKey key = philox_key(*seed);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x * kElementsPerThread;
  for (int64_t e0 = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * kElementsPerThread; e0 < numel;
       e0 += stride) {
    Quad v;
#pragma unroll
    for (int j = 0; j < 4; ++j) v.v[j] = e0 + j < numel ? normal_at(key, offset + static_cast<uint64_t>(e0 + j)) : 0.0f;
    // a flat tensor is one row; the quad is aligned because e0 % 4 == 0
    const int64_t rest = numel - e0;
    store_quad(out + e0, 0, rest < 4 ? static_cast<int>(rest) : 4, rest >= 4, v);
  }
}

// (w0[k], w1[k]) = the first two Philox words of counter[k] (test hook).
__global__ void __launch_bounds__(kMaxThreads) philox_words_kernel(const int64_t* seed, const int64_t* counter,
                                                                   int64_t numel, int64_t* w0, int64_t* w1) {
  const PhiloxKey key = philox_key(*seed);
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < numel;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const PhiloxWords w = philox_words(static_cast<uint64_t>(counter[k]), key);
    w0[k] = w.w0;
    w1[k] = w.w1;
  }
}

// z[t, i, d] = a[t, i] W[y_i, d] + b[t, i] eps(seed, (t B + i) D + d), 4 flat elements per thread;
// index_t is uint32_t when every flat index fits (fast division), else uint64_t.
template <typename index_t>
__global__ void __launch_bounds__(kMaxThreads) noised_latents_forward_kernel(
    const float* W, const int64_t* y, const float* a, const float* b, const int64_t* seed, float* z, index_t numel,
    IntDivider<index_t> by_D, IntDivider<index_t> by_B, int C, int D, int B) {
  const PhiloxKey key = philox_key(*seed);
  const index_t stride = static_cast<index_t>(gridDim.x) * blockDim.x * kElementsPerThread;
  for (index_t e0 = (static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x) * kElementsPerThread; e0 < numel;
       e0 += stride) {
    const auto row_col = by_D.divmod(e0);
    index_t row = row_col.div;
    int d = static_cast<int>(row_col.mod);
    int i = static_cast<int>(by_B.mod(row));
    Quad v;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      v.v[j] = 0.0f;
      if (e0 + j < numel) {
        const int64_t label = checked_label(y, i, C);
        v.v[j] = noised_latent(a[row], W[label * D + d], b[row], normal_at(key, static_cast<uint64_t>(e0) + j));
      }
      if (++d == D) {  // next element starts the next row
        d = 0;
        ++row;
        if (++i == B) i = 0;
      }
    }
    const index_t rest = numel - e0;
    store_quad(z + e0, 0, rest < 4 ? static_cast<int>(rest) : 4, rest >= 4, v);
  }
}

// ================================================================================== row kernels

// Inputs shared by the row kernels; rows are n = t B + i (training ops) or n (latent update).
struct RowShape {
  int64_t N, B;         // rows, examples per block (labels repeat every B rows)
  int C, D, quads;      // classes, embedding dimensions, ceil(D / 4)
  int lanes_log2;       // lanes per row = 1 << lanes_log2
  int probs_stride;     // shared-memory stride of a row's class weights (odd: no bank conflicts)
  bool vec;             // D % 4 == 0 and all row arrays 16-byte aligned
};

// glogits[c] = readout_backward(probs[c], dprobs[c]) with dprobs[c] = <G_row, W[c]>, for the group's
// lanes' classes c = lane, lane + lanes, ...: the gradient of the logits from G = d loss / d u_hat
// (u_hat = probs @ W), whose quads the group wrote to shared memory (the caller __syncwarp()s first).
// All lanes call it; inactive rows read and write nothing.
template <typename logit_t>
__device__ void readout_grad_row(const RowShape& shape, const float4* G_row, const float* W, bool softmax, bool active,
                                 const RowGroup& g, const float* probs, float* dprobs, logit_t* glogits) {
  float prob_dot_dprob = 0.0f;
  if (active) {
    for (int c = g.lane; c < shape.C; c += g.lanes) {
      const float* w_c = W + static_cast<int64_t>(c) * shape.D;
      float4 dp = make_float4(0.f, 0.f, 0.f, 0.f);  // four independent sums: shorter FMA chains
      for (int q = 0; q < shape.quads; ++q) {
        const float4 gq = G_row[q];
        const Quad wq = load_quad(w_c, q, shape.D, shape.vec);
        dp.x += gq.x * wq.v[0];
        dp.y += gq.y * wq.v[1];
        dp.z += gq.z * wq.v[2];
        dp.w += gq.w * wq.v[3];
      }
      dprobs[c] = (dp.x + dp.y) + (dp.z + dp.w);
      prob_dot_dprob += probs[c] * dprobs[c];
    }
  }
  prob_dot_dprob = group_sum(prob_dot_dprob, g.lanes);
  if (!active) return;
  for (int c = g.lane; c < shape.C; c += g.lanes) {
    glogits[c] = static_cast<logit_t>(readout_backward(probs[c], dprobs[c], prob_dot_dprob, softmax));
  }
}

// grad_z [N, D] -> gW [C, D] (one-hot outer sum), ga [N] = <grad_z, W[y]>, gb [N] = <grad_z, eps>.
__global__ void __launch_bounds__(kMaxThreads) noised_latents_backward_kernel(
    RowShape shape, const float* grad_z, const float* W, const int64_t* y, const float* a, const int64_t* seed,
    float* ga, float* gb, OuterSum gW_sum) {
  extern __shared__ float4 smem[];
  const RowGroup g(shape.lanes_log2);
  const bool needs_W = gW_sum.gW != nullptr;
  // shared memory: G [rows][quads] float4, then gW partials, then labels [rows], scales [rows]
  float4* G = smem;
  gW_sum.acc = gW_sum.in_shared ? G + g.rows * shape.quads : nullptr;
  const int gW_acc_size = gW_sum.in_shared ? gW_sum.slices * shape.C * shape.quads : 0;
  int* labels = reinterpret_cast<int*>(G + g.rows * shape.quads + gW_acc_size);
  float* scales = reinterpret_cast<float*>(labels + g.rows);
  if (needs_W) zero_outer_sum(gW_sum);
  const PhiloxKey key = gb ? philox_key(*seed) : PhiloxKey{0, 0};

  for (int64_t tile = blockIdx.x; tile * g.rows < shape.N; tile += gridDim.x) {
    const int64_t row = tile * g.rows + g.slot;
    const bool active = row < shape.N;
    float dot_W = 0.0f, dot_eps = 0.0f;
    if (active) {
      const int64_t label = checked_label(y, row % shape.B, shape.C);
      const float* grad_row = grad_z + row * shape.D;
      const float* w_y = W + label * shape.D;
      for (int q = g.lane; q < shape.quads; q += g.lanes) {
        const Quad grad = load_quad(grad_row, q, shape.D, shape.vec);
        if (needs_W) G[g.slot * shape.quads + q] = to_float4(grad);
        if (ga) dot_W += dot4(grad, load_quad(w_y, q, shape.D, shape.vec));
        if (gb) dot_eps += dot4(grad, noise_quad(key, static_cast<uint64_t>(row) * shape.D, q, shape.D));
      }
      if (needs_W && g.lane == 0) {
        labels[g.slot] = static_cast<int>(label);
        scales[g.slot] = a[row];
      }
    }
    if (ga) dot_W = group_sum(dot_W, g.lanes);
    if (gb) dot_eps = group_sum(dot_eps, g.lanes);
    if (active && g.lane == 0) {
      if (ga) ga[row] = dot_W;
      if (gb) gb[row] = dot_eps;
    }
    if (needs_W) {
      __syncthreads();
      accumulate_outer_sum(gW_sum, OneHotCoef{labels, scales}, G, tile_rows(shape.N, tile, g.rows));
      __syncthreads();
    }
  }
  if (needs_W) flush_outer_sum(gW_sum);
}

// Inputs of the denoising-loss kernels.
template <typename logit_t>
struct LossInputs {
  const logit_t* logits;    // [N, C]
  const float* W;           // [C, D]
  const int64_t* y;         // [B]
  const float* weight;      // [N]
  const float* noise_coef;  // [N] or null (no noise in the target)
  const int64_t* seed;      // [1] or null
  bool softmax;
};

// Quad q of the row's residual u_hat - W[y] - c eps.
__device__ __forceinline__ Quad residual_quad(const RowShape& shape, const float* probs, const float* W,
                                              const float* w_y, float noise_coef, PhiloxKey key, int64_t row, int q) {
  const Quad u = mix_quad(probs, W, shape.C, shape.D, q, shape.vec);
  const Quad target = load_quad(w_y, q, shape.D, shape.vec);
  const Quad eps = noise_coef != 0.0f ? noise_quad(key, static_cast<uint64_t>(row) * shape.D, q, shape.D) : Quad{};
  Quad r;
#pragma unroll
  for (int j = 0; j < 4; ++j) r.v[j] = denoising_residual(u.v[j], target.v[j], noise_coef, eps.v[j]);
  return r;
}

// row_sq_error [N] = ||u_hat - target||^2 per row; *loss = sum weight * row_sq_error / B.
template <typename logit_t>
__global__ void __launch_bounds__(kMaxThreads) denoising_loss_forward_kernel(
    RowShape shape, LossInputs<logit_t> in, float* row_sq_error, float* block_partials, unsigned* blocks_done,
    float* loss) {
  extern __shared__ float4 smem[];
  const RowGroup g(shape.lanes_log2);
  float* probs = reinterpret_cast<float*>(smem) + g.slot * shape.probs_stride;
  const PhiloxKey key = in.noise_coef ? philox_key(*in.seed) : PhiloxKey{0, 0};
  float weighted = 0.0f;

  for (int64_t tile = blockIdx.x; tile * g.rows < shape.N; tile += gridDim.x) {
    const int64_t row = tile * g.rows + g.slot;
    const bool active = row < shape.N;
    readout_row(in.logits + (active ? row : 0) * shape.C, shape.C, in.softmax, active, g, probs);
    __syncwarp();
    float sq = 0.0f;
    if (active) {
      const float* w_y = in.W + checked_label(in.y, row % shape.B, shape.C) * shape.D;
      const float c = in.noise_coef ? in.noise_coef[row] : 0.0f;
      for (int q = g.lane; q < shape.quads; q += g.lanes) {
        const Quad r = residual_quad(shape, probs, in.W, w_y, c, key, row, q);
        sq += dot4(r, r);
      }
    }
    sq = group_sum(sq, g.lanes);
    if (active && g.lane == 0) {
      row_sq_error[row] = sq;
      weighted += in.weight[row] * sq;
    }
    __syncwarp();  // the next tile rewrites probs
  }
  grid_sum(block_sum(weighted), static_cast<float>(shape.B), block_partials, blocks_done, loss);
}

// glogits [N, C] and gW [C, D] of the loss: G = 2 weight (u_hat - target) / B * grad_loss,
// dprobs = G W^T, glogits = readout_backward(dprobs), gW = sum_rows (probs - onehot(y))^T G.
template <typename logit_t>
__global__ void __launch_bounds__(kMaxThreads) denoising_loss_backward_kernel(
    RowShape shape, LossInputs<logit_t> in, const float* grad_loss, logit_t* glogits, OuterSum gW_sum) {
  extern __shared__ float4 smem[];
  const RowGroup g(shape.lanes_log2);
  const bool needs_W = gW_sum.gW != nullptr;
  // shared memory: G [rows][quads] float4, then gW partials, then probs, dprobs [rows][probs_stride]
  float4* G = smem;
  gW_sum.acc = gW_sum.in_shared ? G + g.rows * shape.quads : nullptr;
  const int gW_acc_size = gW_sum.in_shared ? gW_sum.slices * shape.C * shape.quads : 0;
  float* probs_all = reinterpret_cast<float*>(G + g.rows * shape.quads + gW_acc_size);
  float* probs = probs_all + g.slot * shape.probs_stride;
  float* dprobs = probs_all + (g.rows + g.slot) * shape.probs_stride;
  if (needs_W) zero_outer_sum(gW_sum);
  const PhiloxKey key = in.noise_coef ? philox_key(*in.seed) : PhiloxKey{0, 0};
  const float upstream = *grad_loss;

  for (int64_t tile = blockIdx.x; tile * g.rows < shape.N; tile += gridDim.x) {
    const int64_t row = tile * g.rows + g.slot;
    const bool active = row < shape.N;
    readout_row(in.logits + (active ? row : 0) * shape.C, shape.C, in.softmax, active, g, probs);
    __syncwarp();
    int64_t label = 0;
    if (active) {  // G row into shared memory
      label = checked_label(in.y, row % shape.B, shape.C);
      const float* w_y = in.W + label * shape.D;
      const float c = in.noise_coef ? in.noise_coef[row] : 0.0f;
      const float scale = denoising_grad_scale(in.weight[row], upstream, shape.B);
      for (int q = g.lane; q < shape.quads; q += g.lanes) {
        const Quad r = residual_quad(shape, probs, in.W, w_y, c, key, row, q);
        G[g.slot * shape.quads + q] = make_float4(scale * r.v[0], scale * r.v[1], scale * r.v[2], scale * r.v[3]);
      }
    }
    __syncwarp();
    readout_grad_row(shape, G + g.slot * shape.quads, in.W, in.softmax, active, g, probs, dprobs,
                     glogits + (active ? row : 0) * shape.C);
    // probs become the gW coefficients probs - onehot(y), by the lane that read probs[label] above
    if (active && label % g.lanes == g.lane) probs[label] -= 1.0f;
    if (needs_W) {
      __syncthreads();
      accumulate_outer_sum(gW_sum, DenseCoef{probs_all, shape.probs_stride}, G, tile_rows(shape.N, tile, g.rows));
      __syncthreads();
    } else {
      __syncwarp();  // the next tile rewrites probs and G
    }
  }
  if (needs_W) flush_outer_sum(gW_sum);
}

// z_new [N, D] = p readout(logits) @ W + q z + r eps; rows with r = 0 draw no noise.
template <typename logit_t, typename z_t>
__global__ void __launch_bounds__(kMaxThreads) latent_update_kernel(
    RowShape shape, const logit_t* logits, const float* W, const z_t* z, const float* p, const float* q,
    const float* r, const int64_t* seed, bool softmax, z_t* z_new) {
  extern __shared__ float4 smem[];
  const RowGroup g(shape.lanes_log2);
  float* probs = reinterpret_cast<float*>(smem) + g.slot * shape.probs_stride;
  const PhiloxKey key = philox_key(*seed);

  for (int64_t tile = blockIdx.x; tile * g.rows < shape.N; tile += gridDim.x) {
    const int64_t row = tile * g.rows + g.slot;
    const bool active = row < shape.N;
    readout_row(logits + (active ? row : 0) * shape.C, shape.C, softmax, active, g, probs);
    __syncwarp();
    if (active) {
      const float pn = p[row], qn = q[row], rn = r[row];
      const z_t* z_row = z + row * shape.D;
      for (int quad = g.lane; quad < shape.quads; quad += g.lanes) {
        const Quad u = mix_quad(probs, W, shape.C, shape.D, quad, shape.vec);
        const Quad zq = load_quad(z_row, quad, shape.D, shape.vec);
        const Quad eps = rn != 0.0f ? noise_quad(key, static_cast<uint64_t>(row) * shape.D, quad, shape.D) : Quad{};
        Quad out;
#pragma unroll
        for (int j = 0; j < 4; ++j) out.v[j] = latent_step(pn, u.v[j], qn, zq.v[j], rn, eps.v[j]);
        store_quad(z_new + row * shape.D, quad, shape.D, shape.vec, out);
      }
    }
    __syncwarp();  // the next tile rewrites probs
  }
}

// Inputs of the latent-update backward kernel.
template <typename logit_t, typename z_t>
struct StepGradInputs {
  const z_t* grad;        // [N, D], d loss / d z_new
  const logit_t* logits;  // [N, C]
  const float* W;         // [C, D]
  const z_t* z;           // [N, D]
  const float* p;         // [N]
  const float* q;         // [N]
  const int64_t* seed;    // [1]
  bool softmax;
};

// Gradients of the latent update; null where not needed (the W gradient is the kernel's OuterSum).
template <typename logit_t, typename z_t>
struct StepGrads {
  logit_t* glogits;  // [N, C]
  z_t* gz;           // [N, D]
  float *gp, *gq, *gr;  // [N]
};

// From g = grad: gz = q g; gp = <g, u_hat>, gq = <g, z>, gr = <g, eps> per row; G = p g = d loss / d
// u_hat, dprobs = G W^T, glogits = readout_backward(dprobs); gW = sum_rows probs^T G. Rows draw
// noise only for gr.
template <typename logit_t, typename z_t>
__global__ void __launch_bounds__(kMaxThreads) latent_update_backward_kernel(
    RowShape shape, StepGradInputs<logit_t, z_t> in, StepGrads<logit_t, z_t> out, OuterSum gW_sum) {
  extern __shared__ float4 smem[];
  const RowGroup g(shape.lanes_log2);
  const bool needs_W = gW_sum.gW != nullptr;
  const bool needs_G = needs_W || out.glogits;  // the rows' G in shared memory
  const bool needs_probs = needs_G || out.gp;
  // shared memory: G [rows][quads] float4, then gW partials, then probs, dprobs [rows][probs_stride]
  float4* G = smem;
  gW_sum.acc = gW_sum.in_shared ? G + g.rows * shape.quads : nullptr;
  const int gW_acc_size = gW_sum.in_shared ? gW_sum.slices * shape.C * shape.quads : 0;
  float* probs_all = reinterpret_cast<float*>(G + g.rows * shape.quads + gW_acc_size);
  float* probs = probs_all + g.slot * shape.probs_stride;
  float* dprobs = probs_all + (g.rows + g.slot) * shape.probs_stride;
  if (needs_W) zero_outer_sum(gW_sum);
  const PhiloxKey key = out.gr ? philox_key(*in.seed) : PhiloxKey{0, 0};

  for (int64_t tile = blockIdx.x; tile * g.rows < shape.N; tile += gridDim.x) {
    const int64_t row = tile * g.rows + g.slot;
    const bool active = row < shape.N;
    if (needs_probs) readout_row(in.logits + (active ? row : 0) * shape.C, shape.C, in.softmax, active, g, probs);
    __syncwarp();
    float dot_u = 0.0f, dot_z = 0.0f, dot_eps = 0.0f;
    if (active) {
      const float pn = in.p[row], qn = in.q[row];
      const z_t* grad_row = in.grad + row * shape.D;
      for (int quad = g.lane; quad < shape.quads; quad += g.lanes) {
        const Quad grad = load_quad(grad_row, quad, shape.D, shape.vec);
        if (out.gz) {
          Quad dz;
#pragma unroll
          for (int j = 0; j < 4; ++j) dz.v[j] = latent_step_grad_z(qn, grad.v[j]);
          store_quad(out.gz + row * shape.D, quad, shape.D, shape.vec, dz);
        }
        if (out.gp) dot_u += dot4(grad, mix_quad(probs, in.W, shape.C, shape.D, quad, shape.vec));
        if (out.gq) dot_z += dot4(grad, load_quad(in.z + row * shape.D, quad, shape.D, shape.vec));
        if (out.gr) dot_eps += dot4(grad, noise_quad(key, static_cast<uint64_t>(row) * shape.D, quad, shape.D));
        if (needs_G) {
          Quad du;
#pragma unroll
          for (int j = 0; j < 4; ++j) du.v[j] = latent_step_grad_u_hat(pn, grad.v[j]);
          G[g.slot * shape.quads + quad] = to_float4(du);
        }
      }
    }
    if (out.gp) dot_u = group_sum(dot_u, g.lanes);
    if (out.gq) dot_z = group_sum(dot_z, g.lanes);
    if (out.gr) dot_eps = group_sum(dot_eps, g.lanes);
    if (active && g.lane == 0) {
      if (out.gp) out.gp[row] = dot_u;
      if (out.gq) out.gq[row] = dot_z;
      if (out.gr) out.gr[row] = dot_eps;
    }
    __syncwarp();
    if (out.glogits) {
      readout_grad_row(shape, G + g.slot * shape.quads, in.W, in.softmax, active, g, probs, dprobs,
                       out.glogits + (active ? row : 0) * shape.C);
    }
    if (needs_W) {
      __syncthreads();
      accumulate_outer_sum(gW_sum, DenseCoef{probs_all, shape.probs_stride}, G, tile_rows(shape.N, tile, g.rows));
      __syncthreads();
    } else {
      __syncwarp();  // the next tile rewrites probs and G
    }
  }
  if (needs_W) flush_outer_sum(gW_sum);
}

// ================================================================================== conv epilogue

// The epilogue's geometry: strides (elements) of x, y (argmax shares y's) and the upstream/input
// gradients, and the dropout key's counters.
struct EpilogueGeometry {
  int64_t x_b, x_k, x_h, x_w;
  int64_t y_b, y_k, y_h, y_w;
  int Ho, Wo, C;
  bool pooled;
  float p, scale;
  uint32_t row_offset, block_offset, stream;
};

// (b, k, ho, wo) of flat index `idx` in the launch order: channels fastest when the input is
// channels-last (coalesced), else columns fastest. by_0, by_1, by_2 divide by the three fastest sizes.
template <typename index_t, bool kChannelsInner>
__device__ __forceinline__ void epilogue_position(index_t idx, IntDivider<index_t> by_0, IntDivider<index_t> by_1,
                                                  IntDivider<index_t> by_2, int64_t& b, int64_t& k, int64_t& ho,
                                                  int64_t& wo) {
  const auto d0 = by_0.divmod(idx);
  const auto d1 = by_1.divmod(d0.div);
  const auto d2 = by_2.divmod(d1.div);
  if (kChannelsInner) {  // ((b Ho + ho) Wo + wo) K + k
    k = d0.mod, wo = d1.mod, ho = d2.mod, b = d2.div;
  } else {  // ((b K + k) Ho + ho) Wo + wo
    wo = d0.mod, ho = d1.mod, k = d2.mod, b = d2.div;
  }
}

template <typename scalar_t, typename index_t, bool kChannelsInner>
__global__ void __launch_bounds__(kMaxThreads) conv_epilogue_forward_kernel(
    const scalar_t* x, const int64_t* seed, scalar_t* y, uint8_t* argmax, index_t numel, IntDivider<index_t> by_0,
    IntDivider<index_t> by_1, IntDivider<index_t> by_2, EpilogueGeometry g) {
  const PhiloxKey key = philox_key(*seed);
  for (index_t idx = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < numel;
       idx += static_cast<index_t>(gridDim.x) * blockDim.x) {
    int64_t b, k, ho, wo;
    epilogue_position<index_t, kChannelsInner>(idx, by_0, by_1, by_2, b, k, ho, wo);
    const int64_t step = g.pooled ? 2 : 1;
    const scalar_t* window = x + b * g.x_b + k * g.x_k + ho * step * g.x_h + wo * step * g.x_w;
    const WindowMax m = g.pooled ? window_max(window, g.x_h, g.x_w) : WindowMax{static_cast<float>(window[0]), 0};
    bool keep = true;
    if (g.p > 0.0f) {
      const uint32_t block = g.block_offset + static_cast<uint32_t>(k / g.C);
      const uint32_t element = static_cast<uint32_t>((ho * g.Wo + wo) * g.C + k % g.C);
      keep = dropout_keep(dropout_draw(key, element, g.row_offset + static_cast<uint32_t>(b), block, g.stream), element, g.p);
    }
    const int64_t at = b * g.y_b + k * g.y_k + ho * g.y_h + wo * g.y_w;
    y[at] = static_cast<scalar_t>(epilogue_value(m.value, keep, g.scale));
    if (g.pooled) argmax[at] = m.index;
  }
}

// grad_x from grad_y (strides in g.x_* for grad_y, g.y_* for y/argmax) into grad_x (gx_* strides).
template <typename scalar_t, typename index_t, bool kChannelsInner>
__global__ void __launch_bounds__(kMaxThreads) conv_epilogue_backward_kernel(
    const scalar_t* grad_y, const scalar_t* y, const uint8_t* argmax, scalar_t* grad_x, index_t numel,
    IntDivider<index_t> by_0, IntDivider<index_t> by_1, IntDivider<index_t> by_2, EpilogueGeometry g, int64_t gx_b,
    int64_t gx_k, int64_t gx_h, int64_t gx_w) {
  for (index_t idx = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < numel;
       idx += static_cast<index_t>(gridDim.x) * blockDim.x) {
    int64_t b, k, ho, wo;
    epilogue_position<index_t, kChannelsInner>(idx, by_0, by_1, by_2, b, k, ho, wo);
    const int64_t at_y = b * g.y_b + k * g.y_k + ho * g.y_h + wo * g.y_w;
    const float upstream = static_cast<float>(grad_y[b * g.x_b + k * g.x_k + ho * g.x_h + wo * g.x_w]);
    const float value = static_cast<float>(y[at_y]) > 0.0f ? upstream * g.scale : 0.0f;
    if (!g.pooled) {
      grad_x[b * gx_b + k * gx_k + ho * gx_h + wo * gx_w] = static_cast<scalar_t>(value);
      continue;
    }
    scalar_t* window = grad_x + b * gx_b + k * gx_k + 2 * ho * gx_h + 2 * wo * gx_w;
    const int index = argmax[at_y];
#pragma unroll
    for (int i = 0; i < 4; ++i) window[(i >> 1) * gx_h + (i & 1) * gx_w] = static_cast<scalar_t>(i == index ? value : 0.0f);
  }
}

// ================================================================================== host side

// An attribute of the current device (multiprocessors, shared memory per block, ...).
int device_attribute(cudaDeviceAttr attribute) {
  int value = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attribute, c10::cuda::current_device()));
  return value;
}

int multiprocessors() { return device_attribute(cudaDevAttrMultiProcessorCount); }

size_t max_smem_per_block() { return static_cast<size_t>(device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin)); }

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream(); }

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

// Blocks for a grid-stride loop over `work_blocks` blocks of work: at most one resident wave.
template <typename Kernel>
int resident_grid(Kernel kernel, int threads, size_t smem, int64_t work_blocks) {
  if (smem > kDefaultSmemLimit) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  }
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem));
  const int64_t resident = static_cast<int64_t>(std::max(per_sm, 1)) * multiprocessors();
  return static_cast<int>(std::max<int64_t>(1, std::min(work_blocks, resident)));
}

// Row layout for N rows of D columns whose tile needs `row_bytes` of shared memory per row: lanes
// per row (the largest power of two <= 32 whose quads per lane leave at most 1/9 of the lanes
// idle) and threads per block (fewer where there are few rows, so that small problems still spread
// over the SMs, or where the tile would pass the default 48 KB of shared memory).
struct RowPlan {
  int lanes_log2, threads, rows;
  int64_t tiles;
  size_t smem;  // rows * row_bytes
};

RowPlan plan_rows(int64_t N, int64_t D, size_t row_bytes) {
  const int64_t quads = (D + 3) / 4;
  int lanes_log2 = 5;
  for (; lanes_log2 > 0; --lanes_log2) {
    const int64_t lanes = int64_t{1} << lanes_log2;
    if ((quads + lanes - 1) / lanes * lanes * 8 <= quads * 9) break;
  }
  const int64_t sms = multiprocessors();
  int threads = kMaxThreads;
  for (;; threads /= 2) {
    const int64_t rows = threads >> lanes_log2;
    const bool few_tiles = threads > 64 && (N + rows - 1) / rows < sms;
    const bool big_tile = threads > 32 && rows * row_bytes > kDefaultSmemLimit;
    if (!few_tiles && !big_tile) break;
  }
  const int rows = threads >> lanes_log2;
  return {lanes_log2, threads, rows, (N + rows - 1) / rows, rows * row_bytes};
}

// Shared-memory bytes per row of the kernels' tiles: class weights (`probs_rows` rows of C | 1
// floats) and G quads.
size_t row_bytes(int64_t C, int64_t D, int probs_rows, bool grad_quads) {
  return probs_rows * static_cast<size_t>(C | 1) * sizeof(float) + (grad_quads ? (D + 3) / 4 * sizeof(float4) : 0);
}

// `rows`: base pointers of the arrays read or written in quads (vector access needs them aligned).
RowShape row_shape(int64_t N, int64_t B, int64_t C, int64_t D, const RowPlan& plan,
                   std::initializer_list<const void*> rows) {
  bool vec = D % 4 == 0;
  for (const void* ptr : rows) vec = vec && aligned16(ptr);
  return {N, B, static_cast<int>(C), static_cast<int>(D), static_cast<int>((D + 3) / 4), plan.lanes_log2,
          static_cast<int>(C | 1), vec};
}

// gW accumulation for a row kernel whose tile takes *smem bytes: partial sums in shared memory
// when they fit beside it (adds their bytes to *smem), else atomics straight to gW.
OuterSum plan_outer_sum(float* gW, const RowShape& shape, const RowPlan& plan, size_t* smem) {
  const int outputs = shape.C * shape.quads;
  const int slices = std::max(1, plan.threads / outputs);
  const size_t acc_bytes = static_cast<size_t>(slices) * outputs * sizeof(float4);
  const bool in_shared = *smem + acc_bytes <= max_smem_per_block();
  if (in_shared) *smem += acc_bytes;
  return {gW, nullptr, shape.C, shape.D, shape.quads, slices, shape.vec, in_shared};
}

void check_smem(const char* op, size_t bytes) {
  TORCH_CHECK(bytes <= max_smem_per_block(), op,
              ": the rows of this problem need more shared memory (", bytes, " bytes) than the device has (",
              max_smem_per_block(), "); reduce C or D or use backend='triton'/'reference'");
}

at::Tensor normal_cuda(const at::Tensor& seed, at::IntArrayRef shape, int64_t offset) {
  check_seed("normal", seed, seed.device());
  TORCH_CHECK(offset >= 0, "normal: offset: expected an int >= 0, got ", offset);
  const c10::cuda::CUDAGuard guard(seed.device());
  at::Tensor out = at::empty(shape, seed.options().dtype(at::kFloat));
  const int64_t numel = out.numel();
  if (numel == 0) return out;
  const int64_t work_blocks = (numel + kMaxThreads * kElementsPerThread - 1) / (kMaxThreads * kElementsPerThread);
  const int grid = resident_grid(normal_kernel, kMaxThreads, 0, work_blocks);
  normal_kernel<<<grid, kMaxThreads, 0, current_stream()>>>(
      seed.data_ptr<int64_t>(), static_cast<uint64_t>(offset), numel, out.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

template <typename index_t>
void launch_noised_latents_forward(const BlockSizes& s, const at::Tensor& W, const at::Tensor& y, const at::Tensor& a,
                                   const at::Tensor& b, const at::Tensor& seed, at::Tensor& z) {
  const int64_t numel = z.numel();
  const int64_t work_blocks = (numel + kMaxThreads * kElementsPerThread - 1) / (kMaxThreads * kElementsPerThread);
  const auto kernel = noised_latents_forward_kernel<index_t>;
  const int grid = resident_grid(kernel, kMaxThreads, 0, work_blocks);
  kernel<<<grid, kMaxThreads, 0, current_stream()>>>(
      W.data_ptr<float>(), y.data_ptr<int64_t>(), a.data_ptr<float>(), b.data_ptr<float>(), seed.data_ptr<int64_t>(),
      z.data_ptr<float>(), static_cast<index_t>(numel), IntDivider<index_t>(static_cast<index_t>(s.D)),
      IntDivider<index_t>(static_cast<index_t>(s.B)), static_cast<int>(s.C), static_cast<int>(s.D),
      static_cast<int>(s.B));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor noised_latents_forward_cuda(const at::Tensor& W, const at::Tensor& y, const at::Tensor& a,
                                       const at::Tensor& b, const at::Tensor& seed) {
  const BlockSizes s = check_noised_latents("noised_latents_forward", W, y, a, b, seed);
  const c10::cuda::CUDAGuard guard(W.device());
  const at::Tensor W32 = W.to(at::kFloat);
  at::Tensor z = at::empty({s.T, s.B, s.D}, W32.options());
  if (z.numel() == 0) return z.to(W.scalar_type());
  // the fast 32-bit division needs every flat index (plus one thread stride of slack) below 2**32
  if (z.numel() < (int64_t{1} << 31)) {
    launch_noised_latents_forward<uint32_t>(s, W32, y, a, b, seed, z);
  } else {
    launch_noised_latents_forward<uint64_t>(s, W32, y, a, b, seed, z);
  }
  return z.to(W.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> noised_latents_backward_cuda(
    const at::Tensor& grad_z, const at::Tensor& W, const at::Tensor& y, const at::Tensor& a, const at::Tensor& b,
    const at::Tensor& seed, bool needs_W, bool needs_a, bool needs_b) {
  const char* op = "noised_latents_backward";
  const BlockSizes s = check_noised_latents(op, W, y, a, b, seed);
  const c10::cuda::CUDAGuard guard(W.device());
  check_tensor(op, "grad_z", grad_z, W.scalar_type(), {s.T, s.B, s.D}, W.device());
  const at::Tensor W32 = W.to(at::kFloat);
  const at::Tensor grad32 = grad_z.to(at::kFloat);
  at::Tensor gW = needs_W ? at::zeros_like(W32) : W.new_empty({0});
  at::Tensor ga = needs_a ? at::empty_like(a) : a.new_empty({0});
  at::Tensor gb = needs_b ? at::empty_like(b) : b.new_empty({0});
  const int64_t N = s.T * s.B;
  if (N > 0 && (needs_W || needs_a || needs_b)) {
    // tile: G quads, label and scale per row when W needs a gradient
    const size_t per_row = needs_W ? row_bytes(0, s.D, 0, true) + sizeof(int) + sizeof(float) : 0;
    const RowPlan plan = plan_rows(N, s.D, per_row);
    const RowShape shape = row_shape(N, s.B, s.C, s.D, plan, {grad32.data_ptr(), W32.data_ptr()});
    size_t smem = plan.smem;
    OuterSum gW_sum{};
    if (needs_W) gW_sum = plan_outer_sum(gW.data_ptr<float>(), shape, plan, &smem);
    check_smem(op, smem);
    const int grid = resident_grid(noised_latents_backward_kernel, plan.threads, smem, plan.tiles);
    noised_latents_backward_kernel<<<grid, plan.threads, smem, current_stream()>>>(
        shape, grad32.data_ptr<float>(), W32.data_ptr<float>(), y.data_ptr<int64_t>(), a.data_ptr<float>(),
        seed.data_ptr<int64_t>(), needs_a ? ga.data_ptr<float>() : nullptr, needs_b ? gb.data_ptr<float>() : nullptr,
        gW_sum);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {needs_W ? gW.to(W.scalar_type()) : gW, ga, gb};
}

template <typename logit_t>
LossInputs<logit_t> loss_inputs(const at::Tensor& logits, const at::Tensor& W32, const at::Tensor& y,
                                const at::Tensor& weight, const std::optional<at::Tensor>& noise_coef,
                                const std::optional<at::Tensor>& seed, bool softmax) {
  return {logits.data_ptr<logit_t>(),
          W32.data_ptr<float>(),
          y.data_ptr<int64_t>(),
          weight.data_ptr<float>(),
          noise_coef.has_value() ? noise_coef->data_ptr<float>() : nullptr,
          seed.has_value() ? seed->data_ptr<int64_t>() : nullptr,
          softmax};
}

std::tuple<at::Tensor, at::Tensor> denoising_loss_forward_cuda(const at::Tensor& logits, const at::Tensor& W,
                                                               const at::Tensor& y, const at::Tensor& weight,
                                                               const std::optional<at::Tensor>& noise_coef,
                                                               const std::optional<at::Tensor>& seed, bool softmax) {
  const char* op = "denoising_loss_forward";
  const BlockSizes s = check_denoising_loss(op, logits, W, y, weight, noise_coef, seed);
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor W32 = W.to(at::kFloat);
  at::Tensor row_sq_error = at::empty({s.T, s.B}, weight.options());
  const int64_t N = s.T * s.B;
  // no rows: the sum over t is 0, but with B = 0 its 1/B makes it NaN, as on the CPU and in the reference
  if (N == 0) return {at::full({}, s.B == 0 ? NAN : 0.0f, weight.options()), row_sq_error};
  at::Tensor loss = at::empty({}, weight.options());
  const RowPlan plan = plan_rows(N, s.D, row_bytes(s.C, s.D, 1, false));
  const RowShape shape = row_shape(N, s.B, s.C, s.D, plan, {W32.data_ptr()});
  const size_t smem = plan.smem;
  check_smem(op, smem);
  NOPROP_DISPATCH_ACTIVATIONS(logits.scalar_type(), "denoising_loss_forward", [&] {
    const auto kernel = denoising_loss_forward_kernel<scalar_t>;
    const int grid = resident_grid(kernel, plan.threads, smem, plan.tiles);
    at::Tensor block_partials = at::empty({grid}, weight.options());
    at::Tensor blocks_done = at::zeros({1}, weight.options().dtype(at::kInt));
    kernel<<<grid, plan.threads, smem, current_stream()>>>(
        shape, loss_inputs<scalar_t>(logits, W32, y, weight, noise_coef, seed, softmax), row_sq_error.data_ptr<float>(),
        block_partials.data_ptr<float>(), reinterpret_cast<unsigned*>(blocks_done.data_ptr<int>()),
        loss.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, row_sq_error};
}

std::tuple<at::Tensor, at::Tensor> denoising_loss_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& logits,
                                                                const at::Tensor& W, const at::Tensor& y,
                                                                const at::Tensor& weight,
                                                                const std::optional<at::Tensor>& noise_coef,
                                                                const std::optional<at::Tensor>& seed, bool softmax,
                                                                bool needs_W) {
  const char* op = "denoising_loss_backward";
  const BlockSizes s = check_denoising_loss(op, logits, W, y, weight, noise_coef, seed);
  check_tensor(op, "grad_loss", grad_loss, at::kFloat, {}, logits.device());
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor W32 = W.to(at::kFloat);
  at::Tensor glogits = at::empty_like(logits);
  at::Tensor gW = needs_W ? at::zeros_like(W32) : W.new_empty({0});
  const int64_t N = s.T * s.B;
  if (N > 0) {
    const RowPlan plan = plan_rows(N, s.D, row_bytes(s.C, s.D, 2, true));  // G quads, probs, dprobs
    const RowShape shape = row_shape(N, s.B, s.C, s.D, plan, {W32.data_ptr()});
    size_t smem = plan.smem;
    OuterSum gW_sum{};
    if (needs_W) gW_sum = plan_outer_sum(gW.data_ptr<float>(), shape, plan, &smem);
    check_smem(op, smem);
    NOPROP_DISPATCH_ACTIVATIONS(logits.scalar_type(), "denoising_loss_backward", [&] {
      const auto kernel = denoising_loss_backward_kernel<scalar_t>;
      const int grid = resident_grid(kernel, plan.threads, smem, plan.tiles);
      kernel<<<grid, plan.threads, smem, current_stream()>>>(
          shape, loss_inputs<scalar_t>(logits, W32, y, weight, noise_coef, seed, softmax), grad_loss.data_ptr<float>(),
          glogits.data_ptr<scalar_t>(), gW_sum);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {glogits, needs_W ? gW.to(W.scalar_type()) : gW};
}

at::Tensor latent_update_cuda(const at::Tensor& logits, const at::Tensor& W, const at::Tensor& z, const at::Tensor& p,
                              const at::Tensor& q, const at::Tensor& r, const at::Tensor& seed, bool softmax) {
  const char* op = "latent_update";
  const RowSizes s = check_latent_update(op, logits, W, z, p, q, r, seed);
  const c10::cuda::CUDAGuard guard(z.device());
  const at::Tensor W32 = W.to(at::kFloat);
  at::Tensor z_new = at::empty_like(z);
  if (s.N == 0) return z_new;
  const RowPlan plan = plan_rows(s.N, s.D, row_bytes(s.C, s.D, 1, false));
  const RowShape shape = row_shape(s.N, s.N, s.C, s.D, plan, {W32.data_ptr(), z.data_ptr(), z_new.data_ptr()});
  const size_t smem = plan.smem;
  check_smem(op, smem);
  NOPROP_DISPATCH_ACTIVATIONS(logits.scalar_type(), "latent_update", [&] {
    using logit_t = scalar_t;
    NOPROP_DISPATCH_ACTIVATIONS(z.scalar_type(), "latent_update", [&] {
      const auto kernel = latent_update_kernel<logit_t, scalar_t>;
      const int grid = resident_grid(kernel, plan.threads, smem, plan.tiles);
      kernel<<<grid, plan.threads, smem, current_stream()>>>(
          shape, logits.data_ptr<logit_t>(), W32.data_ptr<float>(), z.data_ptr<scalar_t>(), p.data_ptr<float>(),
          q.data_ptr<float>(), r.data_ptr<float>(), seed.data_ptr<int64_t>(), softmax, z_new.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return z_new;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> latent_update_backward_cuda(
    const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& W, const at::Tensor& z, const at::Tensor& p,
    const at::Tensor& q, const at::Tensor& r, const at::Tensor& seed, bool softmax, bool needs_logits, bool needs_W,
    bool needs_z, bool needs_p, bool needs_q, bool needs_r) {
  const char* op = "latent_update_backward";
  const RowSizes s = check_latent_update(op, logits, W, z, p, q, r, seed);
  check_tensor(op, "grad", grad, z.scalar_type(), {s.N, s.D}, z.device());
  const c10::cuda::CUDAGuard guard(z.device());
  const at::Tensor W32 = W.to(at::kFloat);
  at::Tensor glogits = needs_logits ? at::empty_like(logits) : logits.new_empty({0});
  at::Tensor gW = needs_W ? at::zeros_like(W32) : W.new_empty({0});
  at::Tensor gz = needs_z ? at::empty_like(z) : z.new_empty({0});
  at::Tensor gp = needs_p ? at::empty_like(p) : p.new_empty({0});
  at::Tensor gq = needs_q ? at::empty_like(q) : q.new_empty({0});
  at::Tensor gr = needs_r ? at::empty_like(r) : r.new_empty({0});
  if (s.N > 0 && (needs_logits || needs_W || needs_z || needs_p || needs_q || needs_r)) {
    const RowPlan plan = plan_rows(s.N, s.D, row_bytes(s.C, s.D, 2, true));  // G quads, probs, dprobs
    const RowShape shape = row_shape(s.N, s.N, s.C, s.D, plan,
                                     {W32.data_ptr(), grad.data_ptr(), z.data_ptr(), needs_z ? gz.data_ptr() : nullptr});
    size_t smem = plan.smem;
    OuterSum gW_sum{};
    if (needs_W) gW_sum = plan_outer_sum(gW.data_ptr<float>(), shape, plan, &smem);
    check_smem(op, smem);
    NOPROP_DISPATCH_ACTIVATIONS(logits.scalar_type(), "latent_update_backward", [&] {
      using logit_t = scalar_t;
      NOPROP_DISPATCH_ACTIVATIONS(z.scalar_type(), "latent_update_backward", [&] {
        const auto kernel = latent_update_backward_kernel<logit_t, scalar_t>;
        const int grid = resident_grid(kernel, plan.threads, smem, plan.tiles);
        const StepGradInputs<logit_t, scalar_t> in{grad.data_ptr<scalar_t>(), logits.data_ptr<logit_t>(),
                                                   W32.data_ptr<float>(),     z.data_ptr<scalar_t>(),
                                                   p.data_ptr<float>(),       q.data_ptr<float>(),
                                                   seed.data_ptr<int64_t>(),  softmax};
        const StepGrads<logit_t, scalar_t> grads{needs_logits ? glogits.data_ptr<logit_t>() : nullptr,
                                                 needs_z ? gz.data_ptr<scalar_t>() : nullptr,
                                                 needs_p ? gp.data_ptr<float>() : nullptr,
                                                 needs_q ? gq.data_ptr<float>() : nullptr,
                                                 needs_r ? gr.data_ptr<float>() : nullptr};
        kernel<<<grid, plan.threads, smem, current_stream()>>>(shape, in, grads, gW_sum);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
  return {glogits, needs_W ? gW.to(W.scalar_type()) : gW, gz, gp, gq, gr};
}

// Launch `kernel` over `numel` output elements of an epilogue in the order the input's layout favours.
template <typename index_t, typename Launch>
void launch_epilogue(const EpilogueSizes& s, bool channels_inner, Launch launch) {
  const index_t K = static_cast<index_t>(s.K), Ho = static_cast<index_t>(s.Ho), Wo = static_cast<index_t>(s.Wo);
  if (channels_inner) {
    launch(std::integral_constant<bool, true>{}, IntDivider<index_t>(K), IntDivider<index_t>(Wo), IntDivider<index_t>(Ho));
  } else {
    launch(std::integral_constant<bool, false>{}, IntDivider<index_t>(Wo), IntDivider<index_t>(Ho), IntDivider<index_t>(K));
  }
}

EpilogueGeometry epilogue_geometry(const at::Tensor& in, const at::Tensor& out, const EpilogueSizes& s, bool pooled,
                                   double p, int64_t row_offset, int64_t block_offset, int64_t stream) {
  return {in.stride(0),  in.stride(1),  in.stride(2),  in.stride(3),
          out.stride(0), out.stride(1), out.stride(2), out.stride(3),
          static_cast<int>(s.Ho), static_cast<int>(s.Wo), static_cast<int>(s.C), pooled,
          static_cast<float>(p), dropout_scale(p), static_cast<uint32_t>(row_offset),
          static_cast<uint32_t>(block_offset), static_cast<uint32_t>(stream)};
}

std::tuple<at::Tensor, at::Tensor> conv_epilogue_forward_cuda(const at::Tensor& x, const at::Tensor& seed, double p,
                                                              bool pooled, int64_t blocks, int64_t block_offset,
                                                              int64_t row_offset, int64_t stream,
                                                              bool contiguous_output) {
  const EpilogueSizes s = check_conv_epilogue("conv_epilogue_forward", x, seed, p, pooled, blocks, block_offset,
                                              row_offset, stream);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = epilogue_output(x, s, contiguous_output, x.scalar_type());
  at::Tensor argmax = pooled ? at::empty_like(y, y.options().dtype(at::kByte)) : at::empty({0}, y.options().dtype(at::kByte));
  const int64_t numel = y.numel();
  if (numel == 0) return {y, argmax};
  const EpilogueGeometry g = epilogue_geometry(x, y, s, pooled, p, row_offset, block_offset, stream);
  const bool channels_inner = x.stride(1) == 1 && s.K > 1;
  NOPROP_DISPATCH_ACTIVATIONS(x.scalar_type(), "conv_epilogue_forward", [&] {
    auto run = [&](auto index_zero) {
      using index_t = decltype(index_zero);
      launch_epilogue<index_t>(s, channels_inner, [&](auto inner, auto by_0, auto by_1, auto by_2) {
        auto kernel = conv_epilogue_forward_kernel<scalar_t, index_t, decltype(inner)::value>;
        const int grid = resident_grid(kernel, kMaxThreads, 0, (numel + kMaxThreads - 1) / kMaxThreads);
        kernel<<<grid, kMaxThreads, 0, current_stream()>>>(
            x.data_ptr<scalar_t>(), seed.data_ptr<int64_t>(), y.data_ptr<scalar_t>(),
            pooled ? argmax.data_ptr<uint8_t>() : nullptr, static_cast<index_t>(numel), by_0, by_1, by_2, g);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    };
    if (numel < (int64_t{1} << 31)) run(uint32_t{0}); else run(uint64_t{0});
  });
  return {y, argmax};
}

at::Tensor conv_epilogue_backward_cuda(const at::Tensor& grad_y, const at::Tensor& y, const at::Tensor& argmax,
                                       double p, bool pooled, int64_t height, int64_t width, bool channels_last) {
  const EpilogueSizes s = check_conv_epilogue_backward("conv_epilogue_backward", grad_y, y, argmax, p, pooled, height, width);
  const c10::cuda::CUDAGuard guard(y.device());
  at::Tensor grad_x = epilogue_grad_input(y, s, pooled, channels_last);
  const int64_t numel = y.numel();
  if (numel == 0) return grad_x;
  const EpilogueGeometry g = epilogue_geometry(grad_y, y, s, pooled, p, 0, 0, 0);
  const bool channels_inner = y.stride(1) == 1 && s.K > 1;
  NOPROP_DISPATCH_ACTIVATIONS(y.scalar_type(), "conv_epilogue_backward", [&] {
    auto run = [&](auto index_zero) {
      using index_t = decltype(index_zero);
      launch_epilogue<index_t>(s, channels_inner, [&](auto inner, auto by_0, auto by_1, auto by_2) {
        auto kernel = conv_epilogue_backward_kernel<scalar_t, index_t, decltype(inner)::value>;
        const int grid = resident_grid(kernel, kMaxThreads, 0, (numel + kMaxThreads - 1) / kMaxThreads);
        kernel<<<grid, kMaxThreads, 0, current_stream()>>>(
            grad_y.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), pooled ? argmax.data_ptr<uint8_t>() : nullptr,
            grad_x.data_ptr<scalar_t>(), static_cast<index_t>(numel), by_0, by_1, by_2, g, grad_x.stride(0),
            grad_x.stride(1), grad_x.stride(2), grad_x.stride(3));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    };
    if (numel < (int64_t{1} << 31)) run(uint32_t{0}); else run(uint64_t{0});
  });
  return grad_x;
}

std::tuple<at::Tensor, at::Tensor> philox_words_cuda(const at::Tensor& seed, const at::Tensor& counter) {
  check_seed("philox_words", seed, counter.device());
  check_tensor("philox_words", "counter", counter, at::kLong, counter.sizes(), counter.device());
  const c10::cuda::CUDAGuard guard(counter.device());
  at::Tensor w0 = at::empty_like(counter), w1 = at::empty_like(counter);
  const int64_t numel = counter.numel();
  if (numel == 0) return {w0, w1};
  const int grid = resident_grid(philox_words_kernel, kMaxThreads, 0, (numel + kMaxThreads - 1) / kMaxThreads);
  philox_words_kernel<<<grid, kMaxThreads, 0, current_stream()>>>(
      seed.data_ptr<int64_t>(), counter.data_ptr<int64_t>(), numel, w0.data_ptr<int64_t>(), w1.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {w0, w1};
}

}  // namespace

TORCH_LIBRARY_IMPL(noprop_ext, CUDA, m) {
  m.impl("normal", &normal_cuda);
  m.impl("noised_latents_forward", &noised_latents_forward_cuda);
  m.impl("noised_latents_backward", &noised_latents_backward_cuda);
  m.impl("denoising_loss_forward", &denoising_loss_forward_cuda);
  m.impl("denoising_loss_backward", &denoising_loss_backward_cuda);
  m.impl("latent_update", &latent_update_cuda);
  m.impl("latent_update_backward", &latent_update_backward_cuda);
  m.impl("philox_words", &philox_words_cuda);
  m.impl("conv_epilogue_forward", &conv_epilogue_forward_cuda);
  m.impl("conv_epilogue_backward", &conv_epilogue_backward_cuda);
}

}  // namespace noprop
