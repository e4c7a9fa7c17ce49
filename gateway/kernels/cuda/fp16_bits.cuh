// Bit-level fp16 helpers shared by the kernels: 4- and 8-bit codes become fp16 by OR-ing them into
// the mantissa of 1024.0 (0x6400), so a code q reads as 1024 + q with no conversion instruction.
#pragma once

#include <cuda_fp16.h>
#include <stdint.h>

namespace gptqgw {

__device__ __forceinline__ half2 as_half2(uint32_t bits) { return *reinterpret_cast<half2*>(&bits); }
__device__ __forceinline__ uint32_t half2_bits(half2 h) { return *reinterpret_cast<uint32_t*>(&h); }

__device__ __forceinline__ uint32_t lop_or_and(uint32_t a, uint32_t mask, uint32_t magic) {
  uint32_t out;
  // (a & mask) | magic in one instruction.
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(out) : "r"(a), "r"(mask), "r"(magic));
  return out;
}

// Nibbles (i, i + 4) of a word as the fp16 pair (1024 + q_lo, 1024 + q_hi).
__device__ __forceinline__ uint32_t nibble_pair(uint32_t word, int i) {
  return lop_or_and(word >> (4 * i), 0x000F000F, 0x64006400);
}

}  // namespace gptqgw
