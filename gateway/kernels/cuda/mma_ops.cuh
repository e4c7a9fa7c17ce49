// Tensor-core building blocks of the fragment-layout kernels (mma_gemm.cu, mma_pipe.cu): the
// dequantization of a word into B-fragment registers, ldmatrix, mma.sync m16n8k16, cp.async and the
// split-K epilogue. The layout itself is described in gateway/kernels/mma_layout.py.
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
  // Not volatile: the compiler may schedule the mmas among the loads and dequantization.
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
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

// The split-K epilogue shared by the mma kernels. With one K split, a warp's MT x NT accumulator
// tiles (first row row0, first n8 tile tile0) go straight to out as fp16 plus bias; with several,
// they are added into the fp32 workspace [m_rows, n], and finish_split_k completes the column range.
// Accumulator j of a tile: row (lane / 4) + 8 * (j / 2), column 2 * (lane % 4) + j % 2.
template <int MT, int NT>
__device__ __forceinline__ void store_or_add_tiles(const float (&acc)[MT][NT][4], int row0, int tile0,
                                                   int ntiles, int m_rows, int n, bool split,
                                                   const half* bias, half* out, float* workspace) {
  const int lane = threadIdx.x % 32;
  const int row_in_tile = lane / 4, col_pair = 2 * (lane % 4);
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int t = 0; t < NT; ++t) {
      if (tile0 + t >= ntiles) continue;
      const int col = (tile0 + t) * 8 + col_pair;
      const float b0 = !split && bias ? __half2float(bias[col]) : 0.f;
      const float b1 = !split && bias ? __half2float(bias[col + 1]) : 0.f;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = row0 + mt * 16 + row_in_tile + 8 * h;
        if (row >= m_rows) continue;
        if (split) {
          add_pair(workspace + size_t(row) * n + col, acc[mt][t][2 * h], acc[mt][t][2 * h + 1]);
        } else {
          *reinterpret_cast<half2*>(out + size_t(row) * n + col) =
              __floats2half2_rn(acc[mt][t][2 * h] + b0, acc[mt][t][2 * h + 1] + b1);
        }
      }
    }
}

// Called by every thread of a block after its store_or_add_tiles: the last block of the column
// range [col0, col0 + cols) (counted in counters[blockIdx.x]) writes it out as fp16 plus bias and
// leaves the workspace and the counter zeroed, so no memset runs between calls.
__device__ __forceinline__ void finish_split_k(float* workspace, int* counters, const half* bias,
                                               half* out, int m_rows, int n, int col0, int cols) {
  __threadfence();
  __syncthreads();
  __shared__ int last_block;
  if (threadIdx.x == 0) last_block = atomicAdd(counters + blockIdx.x, 1) == int(gridDim.y) - 1;
  __syncthreads();
  if (!last_block) return;
  __threadfence();
  const int pairs = min(cols, n - col0) / 2;
  for (int i = threadIdx.x; i < m_rows * pairs; i += blockDim.x) {
    const int row = i / pairs, col = col0 + 2 * (i % pairs);
    float2* cell = reinterpret_cast<float2*>(workspace + size_t(row) * n + col);
    float2 v = __ldcg(cell);  // L2: the other blocks' atomics are there, not in this SM's L1
    __stcg(cell, make_float2(0.f, 0.f));
    if (bias) {
      v.x += __half2float(bias[col]);
      v.y += __half2float(bias[col + 1]);
    }
    *reinterpret_cast<half2*>(out + size_t(row) * n + col) = __floats2half2_rn(v.x, v.y);
  }
  if (threadIdx.x == 0) counters[blockIdx.x] = 0;
}

// Throws unless qfrag, scales and zeros form a fragment-layout weight (defined in mma_gemm.cu).
void check_frag(const at::Tensor& qfrag, const at::Tensor& scales,
                const std::optional<at::Tensor>& zeros, int64_t group_size);

}  // namespace gptqgw
