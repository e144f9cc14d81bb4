// Philox 4x32-10 of many counters side by side: portable C++, AVX2 and AVX-512F versions of one
// loop, chosen at run time (see philox_lanes.h).
//
// A round maps (c0, c1, c2, c3) to (hi(B c2) ^ c1 ^ k0, lo(B c2), hi(A c0) ^ c3 ^ k1, lo(A c0)).
// The vector versions form the 32x32 -> 64-bit products with vpmuludq, which multiplies the even
// 32-bit lanes: once for the even lanes and once for the odd ones shifted down, then the low and
// high halves are blended back into place. The words of lane i are stored at out[4 i .. 4 i + 3]
// (a 4 x lanes transpose in registers), the layout philox_block's callers read.

#include "philox_lanes.h"

#include <c10/util/Exception.h>
#include <c10/util/StringUtil.h>

#include <atomic>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define NOPROP_X86_VECTOR 1
#include <immintrin.h>
#endif

namespace noprop {

namespace {

void philox_lanes_portable(const uint32_t* c0_offset, const uint32_t* c2_offset, uint32_t c0_base, uint32_t c1_in,
                           uint32_t c2_base, uint32_t c3_in, PhiloxKey key, int64_t n, uint32_t* out) {
  for (int64_t i0 = 0; i0 < n; i0 += kPhiloxLanes) {
    uint32_t c0[kPhiloxLanes], c1[kPhiloxLanes], c2[kPhiloxLanes], c3[kPhiloxLanes];
    for (int l = 0; l < kPhiloxLanes; ++l) {
      c0[l] = c0_base + c0_offset[i0 + l], c1[l] = c1_in, c2[l] = c2_base + c2_offset[i0 + l], c3[l] = c3_in;
    }
    uint32_t k0 = key.k0, k1 = key.k1;
    for (int round = 0; round < kPhiloxRounds; ++round) {
      for (int l = 0; l < kPhiloxLanes; ++l) {
        const uint64_t prod_b = static_cast<uint64_t>(kPhiloxRoundB) * c2[l];
        const uint64_t prod_a = static_cast<uint64_t>(kPhiloxRoundA) * c0[l];
        const uint32_t n0 = static_cast<uint32_t>(prod_b >> 32) ^ c1[l] ^ k0;
        const uint32_t n2 = static_cast<uint32_t>(prod_a >> 32) ^ c3[l] ^ k1;
        c1[l] = static_cast<uint32_t>(prod_b);
        c3[l] = static_cast<uint32_t>(prod_a);
        c0[l] = n0;
        c2[l] = n2;
      }
      k0 += kPhiloxKeyA;
      k1 += kPhiloxKeyB;
    }
    for (int l = 0; l < kPhiloxLanes; ++l) {
      uint32_t* w = out + 4 * (i0 + l);
      w[0] = c0[l], w[1] = c1[l], w[2] = c2[l], w[3] = c3[l];
    }
  }
}

#ifdef NOPROP_X86_VECTOR

// GCC 12's avx512fintrin.h trips -Wmaybe-uninitialized on its own _mm512_undefined_epi32 (GCC bug
// 105593): the shifts and blends below read no undefined lanes.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

// lo and hi 32 bits of c * m for each of the 8 lanes of c (m: the multiplier in every lane).
__attribute__((target("avx2"))) inline void mul_hilo_avx2(__m256i c, __m256i m, __m256i& lo, __m256i& hi) {
  const __m256i even = _mm256_mul_epu32(c, m);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(c, 32), m);
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}

__attribute__((target("avx2"))) void philox_lanes_avx2(const uint32_t* c0_offset, const uint32_t* c2_offset,
                                                       uint32_t c0_base, uint32_t c1_in, uint32_t c2_base,
                                                       uint32_t c3_in, PhiloxKey key, int64_t n, uint32_t* out) {
  const __m256i ma = _mm256_set1_epi32(static_cast<int>(kPhiloxRoundA));
  const __m256i mb = _mm256_set1_epi32(static_cast<int>(kPhiloxRoundB));
  const __m256i base0 = _mm256_set1_epi32(static_cast<int>(c0_base));
  const __m256i base2 = _mm256_set1_epi32(static_cast<int>(c2_base));
  for (int64_t i0 = 0; i0 < n; i0 += 8) {
    __m256i c0 = _mm256_add_epi32(base0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c0_offset + i0)));
    __m256i c2 = _mm256_add_epi32(base2, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c2_offset + i0)));
    __m256i c1 = _mm256_set1_epi32(static_cast<int>(c1_in)), c3 = _mm256_set1_epi32(static_cast<int>(c3_in));
    uint32_t k0 = key.k0, k1 = key.k1;
    for (int round = 0; round < kPhiloxRounds; ++round) {
      __m256i lo_a, hi_a, lo_b, hi_b;
      mul_hilo_avx2(c0, ma, lo_a, hi_a);
      mul_hilo_avx2(c2, mb, lo_b, hi_b);
      c0 = _mm256_xor_si256(_mm256_xor_si256(hi_b, c1), _mm256_set1_epi32(static_cast<int>(k0)));
      c2 = _mm256_xor_si256(_mm256_xor_si256(hi_a, c3), _mm256_set1_epi32(static_cast<int>(k1)));
      c1 = lo_b;
      c3 = lo_a;
      k0 += kPhiloxKeyA;
      k1 += kPhiloxKeyB;
    }
    // 4 x 8 transpose: u_k holds lanes k and k + 4 as (c0, c1, c2, c3) in its two 128-bit halves
    const __m256i t0 = _mm256_unpacklo_epi32(c0, c1), t1 = _mm256_unpackhi_epi32(c0, c1);
    const __m256i t2 = _mm256_unpacklo_epi32(c2, c3), t3 = _mm256_unpackhi_epi32(c2, c3);
    const __m256i u0 = _mm256_unpacklo_epi64(t0, t2), u1 = _mm256_unpackhi_epi64(t0, t2);
    const __m256i u2 = _mm256_unpacklo_epi64(t1, t3), u3 = _mm256_unpackhi_epi64(t1, t3);
    __m256i* o = reinterpret_cast<__m256i*>(out + 4 * i0);
    _mm256_storeu_si256(o + 0, _mm256_permute2x128_si256(u0, u1, 0x20));  // lanes 0, 1
    _mm256_storeu_si256(o + 1, _mm256_permute2x128_si256(u2, u3, 0x20));  // lanes 2, 3
    _mm256_storeu_si256(o + 2, _mm256_permute2x128_si256(u0, u1, 0x31));  // lanes 4, 5
    _mm256_storeu_si256(o + 3, _mm256_permute2x128_si256(u2, u3, 0x31));  // lanes 6, 7
  }
}

// lo and hi 32 bits of c * m for each of the 16 lanes of c.
__attribute__((target("avx512f"))) inline void mul_hilo_avx512(__m512i c, __m512i m, __m512i& lo, __m512i& hi) {
  const __m512i even = _mm512_mul_epu32(c, m);
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(c, 32), m);
  lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
  hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
}

__attribute__((target("avx512f"))) void philox_lanes_avx512(const uint32_t* c0_offset, const uint32_t* c2_offset,
                                                            uint32_t c0_base, uint32_t c1_in, uint32_t c2_base,
                                                            uint32_t c3_in, PhiloxKey key, int64_t n, uint32_t* out) {
  const __m512i ma = _mm512_set1_epi32(static_cast<int>(kPhiloxRoundA));
  const __m512i mb = _mm512_set1_epi32(static_cast<int>(kPhiloxRoundB));
  const __m512i base0 = _mm512_set1_epi32(static_cast<int>(c0_base));
  const __m512i base2 = _mm512_set1_epi32(static_cast<int>(c2_base));
  for (int64_t i0 = 0; i0 < n; i0 += 16) {
    __m512i c0 = _mm512_add_epi32(base0, _mm512_loadu_si512(c0_offset + i0));
    __m512i c2 = _mm512_add_epi32(base2, _mm512_loadu_si512(c2_offset + i0));
    __m512i c1 = _mm512_set1_epi32(static_cast<int>(c1_in)), c3 = _mm512_set1_epi32(static_cast<int>(c3_in));
    uint32_t k0 = key.k0, k1 = key.k1;
    for (int round = 0; round < kPhiloxRounds; ++round) {
      __m512i lo_a, hi_a, lo_b, hi_b;
      mul_hilo_avx512(c0, ma, lo_a, hi_a);
      mul_hilo_avx512(c2, mb, lo_b, hi_b);
      c0 = _mm512_xor_si512(_mm512_xor_si512(hi_b, c1), _mm512_set1_epi32(static_cast<int>(k0)));
      c2 = _mm512_xor_si512(_mm512_xor_si512(hi_a, c3), _mm512_set1_epi32(static_cast<int>(k1)));
      c1 = lo_b;
      c3 = lo_a;
      k0 += kPhiloxKeyA;
      k1 += kPhiloxKeyB;
    }
    // 4 x 16 transpose: u_k holds lanes k, k + 4, k + 8, k + 12 as (c0, c1, c2, c3) in its four
    // 128-bit quarters; two rounds of quarter shuffles put lanes 4 q .. 4 q + 3 into output q
    const __m512i t0 = _mm512_unpacklo_epi32(c0, c1), t1 = _mm512_unpackhi_epi32(c0, c1);
    const __m512i t2 = _mm512_unpacklo_epi32(c2, c3), t3 = _mm512_unpackhi_epi32(c2, c3);
    const __m512i u0 = _mm512_unpacklo_epi64(t0, t2), u1 = _mm512_unpackhi_epi64(t0, t2);
    const __m512i u2 = _mm512_unpacklo_epi64(t1, t3), u3 = _mm512_unpackhi_epi64(t1, t3);
    const __m512i v0 = _mm512_shuffle_i32x4(u0, u1, 0x44), v1 = _mm512_shuffle_i32x4(u0, u1, 0xEE);
    const __m512i v2 = _mm512_shuffle_i32x4(u2, u3, 0x44), v3 = _mm512_shuffle_i32x4(u2, u3, 0xEE);
    uint32_t* o = out + 4 * i0;
    _mm512_storeu_si512(o + 0, _mm512_shuffle_i32x4(v0, v2, 0x88));   // lanes 0-3
    _mm512_storeu_si512(o + 16, _mm512_shuffle_i32x4(v0, v2, 0xDD));  // lanes 4-7
    _mm512_storeu_si512(o + 32, _mm512_shuffle_i32x4(v1, v3, 0x88));  // lanes 8-11
    _mm512_storeu_si512(o + 48, _mm512_shuffle_i32x4(v1, v3, 0xDD));  // lanes 12-15
  }
}

#pragma GCC diagnostic pop

#endif  // NOPROP_X86_VECTOR

bool cpu_has(PhiloxIsa isa) {
  switch (isa) {
    case PhiloxIsa::kPortable:
      return true;
#ifdef NOPROP_X86_VECTOR
    case PhiloxIsa::kAvx2:
      return __builtin_cpu_supports("avx2");
    case PhiloxIsa::kAvx512:
      return __builtin_cpu_supports("avx512f");
#endif
    default:
      return false;
  }
}

PhiloxIsa best_isa() {
  for (PhiloxIsa isa : {PhiloxIsa::kAvx512, PhiloxIsa::kAvx2})
    if (cpu_has(isa)) return isa;
  return PhiloxIsa::kPortable;
}

std::atomic<int>& chosen_isa() {
  static std::atomic<int> isa{static_cast<int>(best_isa())};
  return isa;
}

constexpr PhiloxIsa kAllIsas[] = {PhiloxIsa::kPortable, PhiloxIsa::kAvx2, PhiloxIsa::kAvx512};

}  // namespace

void philox_lanes(const uint32_t* c0_offset, const uint32_t* c2_offset, uint32_t c0_base, uint32_t c1,
                  uint32_t c2_base, uint32_t c3, PhiloxKey key, int64_t n, uint32_t* out) {
  switch (philox_isa()) {
#ifdef NOPROP_X86_VECTOR
    case PhiloxIsa::kAvx512:
      return philox_lanes_avx512(c0_offset, c2_offset, c0_base, c1, c2_base, c3, key, n, out);
    case PhiloxIsa::kAvx2:
      return philox_lanes_avx2(c0_offset, c2_offset, c0_base, c1, c2_base, c3, key, n, out);
#endif
    default:
      return philox_lanes_portable(c0_offset, c2_offset, c0_base, c1, c2_base, c3, key, n, out);
  }
}

PhiloxIsa philox_isa() { return static_cast<PhiloxIsa>(chosen_isa().load(std::memory_order_relaxed)); }

std::string philox_isa_name(PhiloxIsa isa) {
  switch (isa) {
    case PhiloxIsa::kAvx512:
      return "avx512";
    case PhiloxIsa::kAvx2:
      return "avx2";
    default:
      return "portable";
  }
}

std::vector<std::string> supported_philox_isas() {
  std::vector<std::string> names;
  for (PhiloxIsa isa : kAllIsas)
    if (cpu_has(isa)) names.push_back(philox_isa_name(isa));
  return names;
}

void set_philox_isa(const std::string& name) {
  for (PhiloxIsa isa : kAllIsas) {
    if (philox_isa_name(isa) != name) continue;
    TORCH_CHECK(cpu_has(isa), "isa: this CPU does not support ", name, " (supported: ",
                c10::Join(", ", supported_philox_isas()), ")");
    chosen_isa().store(static_cast<int>(isa), std::memory_order_relaxed);
    return;
  }
  TORCH_CHECK(false, "isa: expected one of portable, avx2, avx512, got '", name, "'");
}

}  // namespace noprop
