// Tensor-core building blocks of the fragment-layout kernels (mma_gemm.cu, mma_pipe.cu): the
// dequantization of a word into B-fragment registers, ldmatrix, mma.sync m16n8k16, cp.async and the
// split-K accumulation. The layout itself is described in gateway/kernels/mma_layout.py.
#pragma once

#include <ATen/ATen.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include <optional>

#include "fp16_bits.cuh"

namespace gptqgw {

constexpr int kStepK = 128;    // input channels per lane's 16-byte load of the fragment layout
constexpr int kPadHalves = 8;  // shifts each staged row by 16 bytes: ldmatrix rows hit distinct banks

// Pair i of a word, (q - zero) * scale, as one B-fragment register (two fp16).
__device__ __forceinline__ uint32_t dequant_pair(uint32_t word, int i, half2 zero1024, half2 scale) {
  return half2_bits(__hmul2(__hsub2(as_half2(nibble_pair(word, i)), zero1024), scale));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&a)[4], const half* p) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(a[0]), "=r"(a[1]), "=r"(a[2]), "=r"(a[3])
               : "r"(addr));
}

__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void copy_async_16(void* smem, const void* global) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(addr), "l"(global));
}

// As copy_async_16, but fills the 16 bytes with zeros (and reads nothing) when !valid.
__device__ __forceinline__ void copy_async_16_or_zero(void* smem, const void* global, bool valid) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(addr), "l"(global),
               "r"(valid ? 16 : 0));
}

__device__ __forceinline__ void add_pair(float* dst, float a, float b) {
#if __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float2*>(dst), make_float2(a, b));
#else
  atomicAdd(dst, a);
  atomicAdd(dst + 1, b);
#endif
}

// Throws unless qfrag, scales and zeros form a fragment-layout weight (defined in mma_gemm.cu).
void check_frag(const at::Tensor& qfrag, const at::Tensor& scales,
                const std::optional<at::Tensor>& zeros, int64_t group_size);

}  // namespace gptqgw
