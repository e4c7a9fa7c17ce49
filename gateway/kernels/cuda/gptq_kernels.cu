// GPTQ matmul kernels for few rows (decode) and a fast dequantizer (prefill through cuBLAS).
//
// Weights are in the kernel layout of gateway/kernels/triton_layout.py: qweight_t int32 [N, K/pack]
// (one output channel's packed words contiguous), scales_t fp16 [N, G], optional zeros_t fp16 [N, G]
// (absent when symmetric: zero = 2^(bits-1)).
//
// Decode streams every weight byte once per step, so the GEMV is built to keep HBM busy: each lane
// reads 16 bytes per row per step, a warp covers ROWS output channels at once (the activations it
// loads serve all of them), and nibbles become fp16 without an int->float conversion: OR-ing a
// nibble pair into 0x6400 (fp16 1024.0) gives 1024 + q exactly, and the 1024 cancels against the
// zero point (also offset by 1024). Products are summed in fp16 within one 32-bit word (8 weights)
// and in fp32 beyond, which keeps fp16 from overflowing on large activations.

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <optional>

#include "fp16_bits.cuh"

namespace {

using namespace gptqgw;

constexpr int kWarp = 32;

// Nibble (4-bit) or byte (8-bit) pairs of one word as fp16, minus the zero point. 4-bit: pair i
// holds input channels (i, i + 4) of the word's 8; 8-bit: pair i holds (i, i + 2) of its 4.
template <int BITS>
__device__ __forceinline__ void dequant_word(uint32_t word, half2 zero1024, half2* out) {
  if constexpr (BITS == 4) {
#pragma unroll
    for (int i = 0; i < 4; ++i)
      out[i] = __hsub2(as_half2(nibble_pair(word, i)), zero1024);
  } else {
#pragma unroll
    for (int i = 0; i < 2; ++i)
      out[i] = __hsub2(as_half2(lop_or_and(word >> (8 * i), 0x00FF00FF, 0x64006400)), zero1024);
  }
}

// Grid: one block per ROWS * WARPS output channels. Lane l of a warp walks 16-byte chunks
// l, l + 32, ... of its rows' packed words; a chunk (4 words) lies inside one quantization group
// because group sizes are multiples of the chunk. Each chunk is dequantized once and reused for
// all M activation rows; products are summed in fp16 within a word, in fp32 beyond.
template <int BITS, int M, int ROWS, bool HAS_ZEROS>
__global__ void __launch_bounds__(128) gemv_kernel(
    const half* __restrict__ x, const uint32_t* __restrict__ qweight, const half* __restrict__ scales,
    const half* __restrict__ zeros, const half* __restrict__ bias, half* __restrict__ out, int m_rows,
    int n, int k, int groups, int group_size, int x_stride, int out_stride) {
  constexpr int kPack = 32 / BITS;
  constexpr int kChunkK = 4 * kPack;     // input channels per 16-byte chunk
  constexpr int kPairs = kPack / 2;      // half2 pairs per word
  constexpr int kSpan = kPack / 2;       // distance between the two channels of a pair
  const int warp = threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  const int row0 = (blockIdx.x * (blockDim.x / kWarp) + warp) * ROWS;
  if (row0 >= n) return;
  const int words = k / kPack;
  const int chunks = words / 4;

  float acc[ROWS][M];
#pragma unroll
  for (int r = 0; r < ROWS; ++r)
#pragma unroll
    for (int m = 0; m < M; ++m) acc[r][m] = 0.f;

  const half2 sym_zero = __float2half2_rn(1024.f + float(1 << (BITS - 1)));
#pragma unroll 4
  for (int c = lane; c < chunks; c += kWarp) {
    uint4 w[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      const int row = min(row0 + r, n - 1);  // rows past n recompute row n-1; never stored
      w[r] = __ldg(reinterpret_cast<const uint4*>(qweight + size_t(row) * words) + c);
    }
    const int kbase = c * kChunkK;
    const int g = kbase / group_size;
    float s[ROWS];
    half2 dq[ROWS][4 * kPairs];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      const int row = min(row0 + r, n - 1);
      s[r] = __half2float(scales[size_t(row) * groups + g]);
      const half2 z = HAS_ZEROS
                          ? __float2half2_rn(1024.f + __half2float(zeros[size_t(row) * groups + g]))
                          : sym_zero;
      const uint32_t* wr = reinterpret_cast<const uint32_t*>(&w[r]);
#pragma unroll
      for (int j = 0; j < 4; ++j) dequant_word<BITS>(wr[j], z, &dq[r][j * kPairs]);
    }
#pragma unroll
    for (int m = 0; m < M; ++m) {
      if (m >= m_rows) break;
      alignas(16) half xs[kChunkK];
      const uint4* xv = reinterpret_cast<const uint4*>(x + size_t(m) * x_stride + kbase);
#pragma unroll
      for (int i = 0; i < kChunkK / 8; ++i) reinterpret_cast<uint4*>(xs)[i] = __ldg(xv + i);
      half2 xp[4 * kPairs];
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int i = 0; i < kPairs; ++i)
          xp[j * kPairs + i] = __halves2half2(xs[j * kPack + i], xs[j * kPack + i + kSpan]);
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        float part = 0.f;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          half2 a = __hmul2(dq[r][j * kPairs], xp[j * kPairs]);
#pragma unroll
          for (int i = 1; i < kPairs; ++i) a = __hfma2(dq[r][j * kPairs + i], xp[j * kPairs + i], a);
          const float2 f = __half22float2(a);
          part += f.x + f.y;
        }
        acc[r][m] += s[r] * part;
      }
    }
  }

#pragma unroll
  for (int r = 0; r < ROWS; ++r)
#pragma unroll
    for (int m = 0; m < M; ++m)
#pragma unroll
      for (int offset = kWarp / 2; offset > 0; offset /= 2)
        acc[r][m] += __shfl_xor_sync(0xffffffff, acc[r][m], offset);

  if (lane < ROWS * M) {
    const int r = lane / M, m = lane % M;
    const int row = row0 + r;
    if (row < n && m < m_rows) {
      float v = 0.f;
#pragma unroll
      for (int rr = 0; rr < ROWS; ++rr)
#pragma unroll
        for (int mm = 0; mm < M; ++mm)
          if (rr == r && mm == m) v = acc[rr][mm];  // static indices keep acc in registers
      if (bias != nullptr) v += __half2float(bias[row]);
      out[size_t(m) * out_stride + row] = __float2half(v);
    }
  }
}

// One thread per packed word, consecutive threads on consecutive words, so both the 4-byte loads
// and the 16-byte (4-bit) or 8-byte (8-bit) stores of a warp are contiguous.
template <int BITS, bool HAS_ZEROS>
__global__ void dequant_kernel(const uint32_t* __restrict__ qweight, const half* __restrict__ scales,
                               const half* __restrict__ zeros, half* __restrict__ out, int n,
                               int k, int groups, int group_size) {
  constexpr int kPack = 32 / BITS;
  const int words = k / kPack;
  const size_t idx = size_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= size_t(n) * words) return;
  const int row = idx / words;
  const int kbase = (idx % words) * kPack;
  const uint32_t word = __ldg(qweight + idx);
  const int g = kbase / group_size;
  const half2 s = __half2half2(scales[size_t(row) * groups + g]);
  const half2 z = HAS_ZEROS ? __float2half2_rn(1024.f + __half2float(zeros[size_t(row) * groups + g]))
                            : __float2half2_rn(1024.f + float(1 << (BITS - 1)));
  alignas(16) half vals[kPack];
  if constexpr (BITS == 4) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const half2 q = __hmul2(__hsub2(as_half2(nibble_pair(word, i)), z), s);
      vals[i] = __low2half(q);
      vals[i + 4] = __high2half(q);
    }
    *reinterpret_cast<uint4*>(out + size_t(row) * k + kbase) = *reinterpret_cast<const uint4*>(vals);
  } else {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const half2 q = __hmul2(__hsub2(as_half2(lop_or_and(word >> (8 * i), 0x00FF00FF, 0x64006400)), z), s);
      vals[i] = __low2half(q);
      vals[i + 2] = __high2half(q);
    }
    *reinterpret_cast<uint2*>(out + size_t(row) * k + kbase) = *reinterpret_cast<const uint2*>(vals);
  }
}

}  // namespace

namespace {

template <int BITS, int M, int ROWS>
void launch_gemv(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                 const std::optional<at::Tensor>& zeros, const std::optional<at::Tensor>& bias,
                 at::Tensor& out, int64_t group_size) {
  constexpr int kWarps = 4;
  const int n = qweight.size(0);
  const int blocks = (n + kWarps * ROWS - 1) / (kWarps * ROWS);
  auto stream = at::cuda::getCurrentCUDAStream();
  const half* z = zeros ? reinterpret_cast<const half*>(zeros->data_ptr<at::Half>()) : nullptr;
  const half* b = bias ? reinterpret_cast<const half*>(bias->data_ptr<at::Half>()) : nullptr;
  auto args = std::make_tuple(
      reinterpret_cast<const half*>(x.data_ptr<at::Half>()),
      reinterpret_cast<const uint32_t*>(qweight.data_ptr<int32_t>()),
      reinterpret_cast<const half*>(scales.data_ptr<at::Half>()), z, b,
      reinterpret_cast<half*>(out.data_ptr<at::Half>()), int(x.size(0)), n, int(x.size(1)),
      int(scales.size(1)), int(group_size), int(x.stride(0)), int(out.stride(0)));
  if (z != nullptr) {
    std::apply([&](auto... a) { gemv_kernel<BITS, M, ROWS, true><<<blocks, kWarps * kWarp, 0, stream>>>(a...); }, args);
  } else {
    std::apply([&](auto... a) { gemv_kernel<BITS, M, ROWS, false><<<blocks, kWarps * kWarp, 0, stream>>>(a...); }, args);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <int BITS, int ROWS>
void gemv_rows(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
               const std::optional<at::Tensor>& zeros, const std::optional<at::Tensor>& bias,
               at::Tensor& out, int64_t group_size) {
  const int64_t m = x.size(0);
  if (m <= 1) return launch_gemv<BITS, 1, ROWS>(x, qweight, scales, zeros, bias, out, group_size);
  if (m <= 2) return launch_gemv<BITS, 2, ROWS>(x, qweight, scales, zeros, bias, out, group_size);
  if (m <= 4) return launch_gemv<BITS, 4, ROWS>(x, qweight, scales, zeros, bias, out, group_size);
  return launch_gemv<BITS, 8, ROWS>(x, qweight, scales, zeros, bias, out, group_size);
}

void check_common(const at::Tensor& qweight, const at::Tensor& scales,
                  const std::optional<at::Tensor>& zeros, int64_t bits, int64_t group_size,
                  int64_t k) {
  TORCH_CHECK(bits == 4 || bits == 8, "bits must be 4 or 8, got ", bits);
  TORCH_CHECK(qweight.is_cuda() && qweight.scalar_type() == at::kInt && qweight.is_contiguous(),
              "qweight must be a contiguous CUDA int32 tensor");
  TORCH_CHECK(qweight.size(1) * (32 / bits) == k, "qweight has ", qweight.size(1),
              " words per row, which does not match in_features ", k);
  TORCH_CHECK(k % (128 / bits) == 0, "in_features ", k, " must be a multiple of ", 128 / bits);
  TORCH_CHECK(group_size % (128 / bits) == 0, "group_size ", group_size,
              " must be a multiple of ", 128 / bits);
  TORCH_CHECK(scales.scalar_type() == at::kHalf && scales.is_contiguous() &&
                  scales.size(0) == qweight.size(0),
              "scales must be contiguous fp16 [out, groups]");
  if (zeros) {
    TORCH_CHECK(zeros->scalar_type() == at::kHalf && zeros->is_contiguous() &&
                    zeros->sizes() == scales.sizes(),
                "zeros must be contiguous fp16 shaped like scales");
  }
}

}  // namespace

at::Tensor gptq_gemv(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                     const std::optional<at::Tensor>& zeros, const std::optional<at::Tensor>& bias,
                     int64_t bits, int64_t group_size, int64_t rows_per_warp) {
  check_common(qweight, scales, zeros, bits, group_size, x.size(1));
  TORCH_CHECK(x.is_cuda() && x.scalar_type() == at::kHalf && x.dim() == 2 && x.stride(1) == 1 &&
                  x.stride(0) % 8 == 0,
              "x must be fp16 [M, in] with unit stride and rows aligned to 16 bytes");
  TORCH_CHECK(x.size(0) >= 1 && x.size(0) <= 8, "gemv takes 1 to 8 rows, got ", x.size(0));
  const c10::cuda::CUDAGuard guard(x.device());
  auto out = at::empty({x.size(0), qweight.size(0)}, x.options());
  const bool b4 = bits == 4;
  if (rows_per_warp == 2) {
    b4 ? gemv_rows<4, 2>(x, qweight, scales, zeros, bias, out, group_size)
       : gemv_rows<8, 2>(x, qweight, scales, zeros, bias, out, group_size);
  } else if (rows_per_warp == 4) {
    b4 ? gemv_rows<4, 4>(x, qweight, scales, zeros, bias, out, group_size)
       : gemv_rows<8, 4>(x, qweight, scales, zeros, bias, out, group_size);
  } else {
    TORCH_CHECK(false, "rows_per_warp must be 2 or 4, got ", rows_per_warp);
  }
  return out;
}

at::Tensor gptq_dequant(const at::Tensor& qweight, const at::Tensor& scales,
                        const std::optional<at::Tensor>& zeros, int64_t bits, int64_t group_size) {
  const int64_t k = qweight.size(1) * (32 / bits);
  check_common(qweight, scales, zeros, bits, group_size, k);
  const c10::cuda::CUDAGuard guard(qweight.device());
  auto out = at::empty({qweight.size(0), k}, scales.options());
  const int64_t total_words = qweight.numel();
  const int threads = 256;
  const int blocks = int((total_words + threads - 1) / threads);
  auto stream = at::cuda::getCurrentCUDAStream();
  const auto* q = reinterpret_cast<const uint32_t*>(qweight.data_ptr<int32_t>());
  const auto* s = reinterpret_cast<const half*>(scales.data_ptr<at::Half>());
  const half* z = zeros ? reinterpret_cast<const half*>(zeros->data_ptr<at::Half>()) : nullptr;
  auto* o = reinterpret_cast<half*>(out.data_ptr<at::Half>());
  const int n = qweight.size(0), groups = scales.size(1);
  if (bits == 4) {
    z ? dequant_kernel<4, true><<<blocks, threads, 0, stream>>>(q, s, z, o, n, int(k), groups, int(group_size))
      : dequant_kernel<4, false><<<blocks, threads, 0, stream>>>(q, s, z, o, n, int(k), groups, int(group_size));
  } else {
    z ? dequant_kernel<8, true><<<blocks, threads, 0, stream>>>(q, s, z, o, n, int(k), groups, int(group_size))
      : dequant_kernel<8, false><<<blocks, threads, 0, stream>>>(q, s, z, o, n, int(k), groups, int(group_size));
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}
