// mma.sync m16n8k16 (f16 in, f32 acc) throughput ceiling, by warps per SM, with and without
// dequant-like ALU work between mmas. Build: nvcc -O3 -arch=sm_90 benchmarks/diagnostics/mma_peak.cu -o /tmp/mma_peak && /tmp/mma_peak
#include <cstdio>
#include <cuda_fp16.h>
#include <stdint.h>

__device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <int ALU>
__global__ void peak(float* out, int iters, uint32_t seed) {
  uint32_t a[4] = {seed, seed * 3, seed * 5, seed * 7};
  uint32_t w = seed * 11 + threadIdx.x;
  float acc[8][4] = {};
  for (int it = 0; it < iters; ++it) {
#pragma unroll
    for (int t = 0; t < 8; ++t) {
      uint32_t b0 = a[t % 4], b1 = a[(t + 1) % 4];
#pragma unroll
      for (int i = 0; i < ALU; ++i) {  // a lop3 + hsub2 + hmul2 per register, like dequant_pair
        uint32_t q;
        asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(q) : "r"(w >> (4 * i)), "r"(0x000F000Fu), "r"(0x64006400u));
        half2 h = __hmul2(__hsub2(*reinterpret_cast<half2*>(&q), __float2half2_rn(1032.f)), __float2half2_rn(0.01f));
        if (i % 2 == 0) b0 ^= *reinterpret_cast<uint32_t*>(&h); else b1 ^= *reinterpret_cast<uint32_t*>(&h);
      }
      mma(acc[t], a, b0, b1);
    }
    w = w * 1664525u + 1013904223u;
  }
  float s = 0;
#pragma unroll
  for (int t = 0; t < 8; ++t) s += acc[t][0] + acc[t][1] + acc[t][2] + acc[t][3];
  if (s == 12345.f) out[threadIdx.x] = s;
}
template <int ALU>
void run(int warps, int blocks_per_sm, int sms, float* out) {
  const int iters = 4096;
  dim3 grid(sms * blocks_per_sm), block(32 * warps);
  peak<ALU><<<grid, block>>>(out, 16, 1);
  cudaEvent_t e0, e1; cudaEventCreate(&e0); cudaEventCreate(&e1);
  cudaEventRecord(e0);
  peak<ALU><<<grid, block>>>(out, iters, 1);
  cudaEventRecord(e1); cudaEventSynchronize(e1);
  float ms; cudaEventElapsedTime(&ms, e0, e1);
  double flop = 2.0 * 16 * 8 * 16 * 8 * double(iters) * grid.x * warps;
  int clk; cudaDeviceGetAttribute(&clk, cudaDevAttrClockRate, 0);
  double mma_per_subpart = 8.0 * iters * warps * blocks_per_sm / 4;
  printf("alu/mma %d  warps/SM %3d: %7.1f TFLOP/s  %.2f clk per mma per sub-partition (at %d MHz)\n", ALU,
         warps * blocks_per_sm, flop / ms / 1e9, ms * 1e-3 * clk * 1e3 / mma_per_subpart, clk / 1000);
}
int main() {
  int sms; cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
  float* out; cudaMalloc(&out, 4096);
  for (int w : {4, 8, 16, 32}) run<0>(w, 1, sms, out);
  for (int w : {8, 16}) run<2>(w, 1, sms, out);
  for (int w : {8, 16}) run<4>(w, 1, sms, out);
  return 0;
}
