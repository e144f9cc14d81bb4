// Philox 4x32-10 of many counters side by side on the CPU: the dropout masks' draws.
//
// philox_lanes draws the four words of the counters (c0_base + c0_offset[i], c1, c2_base +
// c2_offset[i], c3) for i < n into out[4 i + w], with the same integer arithmetic as
// noprop_math.h's philox_block (so every lane's words are bit-identical to it), on the widest
// instruction set the CPU has: AVX-512F (16 lanes per instruction), AVX2 (8) or portable C++.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "noprop_math.h"

namespace noprop {

constexpr int64_t kPhiloxLanes = 16;  // n must be a multiple of this

enum class PhiloxIsa : int { kPortable = 0, kAvx2 = 1, kAvx512 = 2 };

void philox_lanes(const uint32_t* c0_offset, const uint32_t* c2_offset, uint32_t c0_base, uint32_t c1,
                  uint32_t c2_base, uint32_t c3, PhiloxKey key, int64_t n, uint32_t* out);

// The instruction set philox_lanes uses now, its name, and the ones this CPU supports (portable first).
PhiloxIsa philox_isa();
std::string philox_isa_name(PhiloxIsa isa);
std::vector<std::string> supported_philox_isas();

// Make philox_lanes use the named instruction set ("portable", "avx2", "avx512"; tests compare
// them). Throws c10::Error naming the argument if the name is unknown or the CPU lacks it.
void set_philox_isa(const std::string& name);

}  // namespace noprop
