// 4-bit GPTQ matmul on tensor cores (mma.sync m16n8k16) for 1 to 64 rows, and its dequantizer.
//
// Weights are in the fragment layout of gateway/kernels/mma_layout.py, made once at load:
// qfrag int32 [N/8, K/128, 32 lanes, 4 words]. Word w of lane l in (n8 tile, k128 step) holds the
// 8 nibbles that lane needs as its B fragments for the two k16 slices of k32 sub-block w, ordered
// so that OR-ing a nibble pair into 0x6400 yields the fragment register directly (see
// dequant_pairs). A warp therefore reads its weights as one coalesced 16-byte load per lane per
// 128 inputs and never shuffles them. scales and zeros are [G, N] (group-major), so the 8 columns
// of a tile share one 16-byte run.
//
// A block is WARPS warps side by side along N (NT n8 tiles each) over STEPS k128 steps; the grid's
// second axis splits K. Every weight load of the block is issued before the activations are
// staged in shared memory, so the loads are in flight while the block waits. Split-K partial sums
// are added into an fp32 workspace; the last block to finish a column range (a per-range counter)
// writes fp16 and leaves the workspace and counter zeroed, so no memset runs between calls.

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <optional>

#include "mma_ops.cuh"

namespace {

using namespace gptqgw;

template <int M_TILES, int WARPS, int NT, int STEPS, bool HAS_ZEROS>
__global__ void __launch_bounds__(WARPS * 32) mma_gemm_kernel(
    const half* __restrict__ x, const uint4* __restrict__ qfrag, const half* __restrict__ scales,
    const half* __restrict__ zeros, const half* __restrict__ bias, half* __restrict__ out,
    float* __restrict__ workspace, int* __restrict__ counters, int m_rows, int n, int k,
    int group_size, int x_stride) {
  extern __shared__ __align__(16) half xs[];  // [M_TILES * 16][STEPS * 128 + pad]
  constexpr int kCols = STEPS * kStepK + kPadHalves;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int steps_total = k / kStepK;
  const int step0 = blockIdx.y * STEPS;
  const int nsteps = min(STEPS, steps_total - step0);
  const int ntiles = n / 8;
  const int tile0 = (blockIdx.x * WARPS + warp) * NT;
  const int col_in_tile = lane / 4;

  // 1. This warp's weights, scales and zeros for every step, before anything waits.
  uint4 w[STEPS][NT];
  half2 scale[STEPS][NT], zero1024[STEPS][NT];
  const half2 sym_zero = __float2half2_rn(1024.f + 8.f);
#pragma unroll
  for (int s = 0; s < STEPS; ++s) {
#pragma unroll
    for (int t = 0; t < NT; ++t) {
      const int tile = tile0 + t;
      const bool live = s < nsteps && tile < ntiles;
      w[s][t] = live ? __ldg(qfrag + (size_t(tile) * steps_total + step0 + s) * 32 + lane)
                     : make_uint4(0, 0, 0, 0);
      const size_t at = size_t((step0 + s) * kStepK / group_size) * n + tile * 8 + col_in_tile;
      scale[s][t] = __half2half2(live ? scales[at] : __float2half(0.f));
      zero1024[s][t] = HAS_ZEROS ? __float2half2_rn(1024.f + (live ? __half2float(zeros[at]) : 0.f))
                                 : sym_zero;
    }
  }

  // 2. Stage the activations of this K range with asynchronous copies, all in flight at once (a
  //    load-then-store loop would wait out one L2 round trip per 16 bytes a thread copies). Rows
  //    past m_rows stay unset: their products land in accumulator rows that are never stored
  //    (each output row depends on its own row only).
  const int kbase = step0 * kStepK;
  const int chunks_per_row = nsteps * (kStepK / 8);
  for (int i = threadIdx.x; i < m_rows * chunks_per_row; i += WARPS * 32) {
    const int r = i / chunks_per_row, c = i % chunks_per_row;
    copy_async_16(xs + r * kCols + c * 8, reinterpret_cast<const uint4*>(x + size_t(r) * x_stride + kbase) + c);
  }
  asm volatile("cp.async.commit_group;\n" ::);
  asm volatile("cp.async.wait_group 0;\n" ::);
  __syncthreads();

  // 3. Tensor-core products: per k32 word, dequantize NT tiles' fragments, then each k16 half
  //    loads the A fragments once (ldmatrix) for all NT tiles.
  float acc[M_TILES][NT][4];
#pragma unroll
  for (int mt = 0; mt < M_TILES; ++mt)
#pragma unroll
    for (int t = 0; t < NT; ++t)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[mt][t][j] = 0.f;

  const int a_row = lane % 16, a_col = (lane / 16) * 8;
#pragma unroll
  for (int s = 0; s < STEPS; ++s) {
    if (s >= nsteps) break;
#pragma unroll
    for (int wd = 0; wd < 4; ++wd) {
      uint32_t b[NT][4];
#pragma unroll
      for (int t = 0; t < NT; ++t) {
        const uint32_t word = reinterpret_cast<const uint32_t*>(&w[s][t])[wd];
#pragma unroll
        for (int i = 0; i < 4; ++i) b[t][i] = dequant_pair(word, i, zero1024[s][t], scale[s][t]);
      }
#pragma unroll
      for (int ks = 0; ks < 2; ++ks) {
#pragma unroll
        for (int mt = 0; mt < M_TILES; ++mt) {
          uint32_t a[4];
          ldmatrix_x4(a, xs + (mt * 16 + a_row) * kCols + s * kStepK + wd * 32 + ks * 16 + a_col);
#pragma unroll
          for (int t = 0; t < NT; ++t) mma_16816(acc[mt][t], a, b[t][2 * ks], b[t][2 * ks + 1]);
        }
      }
    }
  }

  // 4. Epilogue.
  const bool split = gridDim.y > 1;
  store_or_add_tiles(acc, 0, tile0, ntiles, m_rows, n, split, bias, out, workspace);
  if (split) finish_split_k(workspace, counters, bias, out, m_rows, n, blockIdx.x * WARPS * NT * 8, WARPS * NT * 8);
}

// One warp per (n8 tile, k128 step): the inverse of the fragment layout, as fp16 [N, K]. A lane's
// pairs belong to 8 different output rows, so the warp assembles its 8 x 128 tile in shared memory
// and then stores it as 16-byte chunks, two full 256-byte row runs per store (storing the pairs
// directly wrote 4-byte pieces to 8 rows and ran at about a third of the bandwidth).
constexpr int kDequantWarps = 8;
constexpr int kTileRowHalves = kStepK + 8;  // 8 halves of padding: the pair stores hit 32 banks

template <bool HAS_ZEROS>
__global__ void __launch_bounds__(kDequantWarps * 32) frag_dequant_kernel(
    const uint4* __restrict__ qfrag, const half* __restrict__ scales, const half* __restrict__ zeros,
    half* __restrict__ out, int n, int k, int group_size) {
  __shared__ __align__(16) half tiles[kDequantWarps][8][kTileRowHalves];
  const int steps = k / kStepK;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const size_t warp_id = size_t(blockIdx.x) * kDequantWarps + warp;
  if (warp_id >= size_t(n / 8) * steps) return;  // warp-uniform; no block barrier follows
  const int tile = warp_id / steps, step = warp_id % steps;
  const uint4 w = __ldg(qfrag + warp_id * 32 + lane);
  const int g = lane / 4, pair_k = 2 * (lane % 4);
  const size_t at = size_t(step * kStepK / group_size) * n + tile * 8 + g;
  const half2 scale = __half2half2(scales[at]);
  const half2 zero1024 =
      HAS_ZEROS ? __float2half2_rn(1024.f + __half2float(zeros[at])) : __float2half2_rn(1024.f + 8.f);
  half* row = tiles[warp][g];
#pragma unroll
  for (int wd = 0; wd < 4; ++wd) {
    const uint32_t word = reinterpret_cast<const uint32_t*>(&w)[wd];
#pragma unroll
    for (int i = 0; i < 4; ++i)
      *reinterpret_cast<uint32_t*>(row + wd * 32 + i * 8 + pair_k) = dequant_pair(word, i, zero1024, scale);
  }
  __syncwarp();
  const int chunk = lane % 16;  // 16-byte chunk of a 256-byte row
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int r = 2 * j + lane / 16;
    *reinterpret_cast<uint4*>(out + size_t(tile * 8 + r) * k + step * kStepK + chunk * 8) =
        *reinterpret_cast<const uint4*>(&tiles[warp][r][chunk * 8]);
  }
}

// Few rows on CUDA cores, straight from the fragment layout: a block covers NT n8 tiles, its warps
// splitting K into runs of steps_per_warp k128 steps (each warp streams contiguous 512-byte chunks
// per tile), no split-K scratch. Lane 4g + t sums column g over inputs 8a + 2t + {0, 1} of each k32
// word; the activation pairs it loads serve all NT tiles. Products are summed in fp16 within a word
// (4 pairs) and in fp32 beyond, as in the row-layout GEMV, so large activations cannot overflow.
template <int M, int NT, bool HAS_ZEROS>
__global__ void __launch_bounds__(256) frag_gemv_kernel(
    const half* __restrict__ x, const uint4* __restrict__ qfrag, const half* __restrict__ scales,
    const half* __restrict__ zeros, const half* __restrict__ bias, half* __restrict__ out, int m_rows,
    int n, int k, int group_size, int x_stride, int steps_per_warp) {
  extern __shared__ float partial[];  // [warps][M][NT * 8]
  constexpr int kUnroll = 4;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  const int tile0 = blockIdx.x * NT, t = lane % 4;
  const int ntiles = n / 8;
  const int steps_total = k / kStepK;
  const int s_begin = warp * steps_per_warp, s_end = min(s_begin + steps_per_warp, steps_total);
  const half2 sym_zero = __float2half2_rn(1024.f + 8.f);

  float acc[NT][M];
#pragma unroll
  for (int j = 0; j < NT; ++j)
#pragma unroll
    for (int m = 0; m < M; ++m) acc[j][m] = 0.f;
  for (int s0 = s_begin; s0 < s_end; s0 += kUnroll) {
    uint4 w[kUnroll][NT];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
#pragma unroll
      for (int j = 0; j < NT; ++j)
        w[u][j] = s0 + u < s_end && tile0 + j < ntiles
                      ? __ldg(qfrag + (size_t(tile0 + j) * steps_total + s0 + u) * 32 + lane)
                      : make_uint4(0, 0, 0, 0);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int s = s0 + u;
      if (s >= s_end) break;
      half2 xp[M][16];  // activation pairs (8a + 2t, +1) of the step's four k32 words
#pragma unroll
      for (int m = 0; m < M; ++m) {
        const half* xr = x + size_t(m < m_rows ? m : 0) * x_stride + s * kStepK + 2 * t;
#pragma unroll
        for (int i = 0; i < 16; ++i) xp[m][i] = __ldg(reinterpret_cast<const half2*>(xr + 8 * i));
      }
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        const int col = min(tile0 + j, ntiles - 1) * 8 + lane / 4;
        const size_t at = size_t(s * kStepK / group_size) * n + col;
        const float scale = __half2float(scales[at]);
        const half2 zero1024 =
            HAS_ZEROS ? __float2half2_rn(1024.f + __half2float(zeros[at])) : sym_zero;
        float part[M];
#pragma unroll
        for (int m = 0; m < M; ++m) part[m] = 0.f;
#pragma unroll
        for (int wd = 0; wd < 4; ++wd) {
          const uint32_t word = reinterpret_cast<const uint32_t*>(&w[u][j])[wd];
          half2 dq[4];
#pragma unroll
          for (int i = 0; i < 4; ++i) dq[i] = __hsub2(as_half2(nibble_pair(word, i)), zero1024);
#pragma unroll
          for (int m = 0; m < M; ++m) {
            half2 a = __hmul2(dq[0], xp[m][wd * 4]);
#pragma unroll
            for (int i = 1; i < 4; ++i) a = __hfma2(dq[i], xp[m][wd * 4 + i], a);
            const float2 f = __half22float2(a);
            part[m] += f.x + f.y;
          }
        }
#pragma unroll
        for (int m = 0; m < M; ++m) acc[j][m] += scale * part[m];
      }
    }
  }
#pragma unroll
  for (int j = 0; j < NT; ++j)
#pragma unroll
    for (int m = 0; m < M; ++m) {
      float v = acc[j][m];
      v += __shfl_xor_sync(0xffffffff, v, 1);
      v += __shfl_xor_sync(0xffffffff, v, 2);
      if (t == 0) partial[(warp * M + m) * NT * 8 + j * 8 + lane / 4] = v;
    }
  __syncthreads();
  for (int i = threadIdx.x; i < M * NT * 8; i += blockDim.x) {
    const int m = i / (NT * 8), c = tile0 * 8 + i % (NT * 8);
    if (m < m_rows && c < n) {
      float v = bias ? __half2float(bias[c]) : 0.f;
      for (int wi = 0; wi < warps; ++wi) v += partial[(wi * M + m) * NT * 8 + i % (NT * 8)];
      out[size_t(m) * n + c] = __float2half(v);
    }
  }
}

template <int M_TILES, int WARPS, int NT, int STEPS, bool HAS_ZEROS>
void launch_mma(const at::Tensor& x, const at::Tensor& qfrag, const at::Tensor& scales,
                const half* zeros, const half* bias, at::Tensor& out, at::Tensor& workspace,
                at::Tensor& counters, int64_t group_size) {
  const int n = qfrag.size(0) * 8, k = qfrag.size(1) * kStepK;
  const int col_blocks = (n / 8 + WARPS * NT - 1) / (WARPS * NT);
  const int splits = (k / kStepK + STEPS - 1) / STEPS;
  TORCH_CHECK(splits == 1 || (workspace.numel() >= x.size(0) * n && counters.numel() >= col_blocks),
              "mma workspace too small: ", workspace.numel(), " floats and ", counters.numel(),
              " counters for ", x.size(0), " x ", n, " outputs in ", col_blocks, " column blocks");
  const int smem = M_TILES * 16 * (STEPS * kStepK + kPadHalves) * sizeof(half);
  auto kernel = mma_gemm_kernel<M_TILES, WARPS, NT, STEPS, HAS_ZEROS>;
  static bool smem_raised = false;  // per instantiation
  if (!smem_raised) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    smem_raised = true;
  }
  kernel<<<dim3(col_blocks, splits), WARPS * 32, smem, at::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const half*>(x.data_ptr<at::Half>()),
      reinterpret_cast<const uint4*>(qfrag.data_ptr<int32_t>()),
      reinterpret_cast<const half*>(scales.data_ptr<at::Half>()), zeros, bias,
      reinterpret_cast<half*>(out.data_ptr<at::Half>()), workspace.data_ptr<float>(),
      counters.data_ptr<int32_t>(), int(x.size(0)), n, k, int(group_size), int(x.stride(0)));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <int M_TILES, int WARPS, int NT, int STEPS>
void mma_zeros(const at::Tensor& x, const at::Tensor& qfrag, const at::Tensor& scales,
               const half* zeros, const half* bias, at::Tensor& out, at::Tensor& workspace,
               at::Tensor& counters, int64_t group_size) {
  zeros ? launch_mma<M_TILES, WARPS, NT, STEPS, true>(x, qfrag, scales, zeros, bias, out, workspace, counters, group_size)
        : launch_mma<M_TILES, WARPS, NT, STEPS, false>(x, qfrag, scales, zeros, bias, out, workspace, counters, group_size);
}

// The configurations benchmarks/bench_kernels.py sweeps (warps, tiles per warp, steps per block).
#define GPTQGW_MMA_CONFIGS(X) \
  X(4, 2, 2) X(4, 2, 4) X(4, 4, 4) X(8, 2, 2) X(8, 2, 4) X(8, 4, 4) X(4, 2, 8) X(8, 2, 8)

template <int M_TILES>
void mma_config(int64_t warps, int64_t tiles_per_warp, int64_t steps_per_block,
                const at::Tensor& x, const at::Tensor& qfrag, const at::Tensor& scales,
                const half* zeros, const half* bias, at::Tensor& out, at::Tensor& workspace,
                at::Tensor& counters, int64_t group_size) {
#define GPTQGW_MMA_CASE(W, T, S)                                                              \
  if (warps == W && tiles_per_warp == T && steps_per_block == S)                             \
    return mma_zeros<M_TILES, W, T, S>(x, qfrag, scales, zeros, bias, out, workspace, counters, \
                                       group_size);
  GPTQGW_MMA_CONFIGS(GPTQGW_MMA_CASE)
#undef GPTQGW_MMA_CASE
  TORCH_CHECK(false, "mma config (warps, tiles_per_warp, steps_per_block) = (", warps, ", ",
              tiles_per_warp, ", ", steps_per_block, ") is not one of the compiled ones");
}

}  // namespace

// Shared with mma_pipe.cu.
void gptqgw::check_frag(const at::Tensor& qfrag, const at::Tensor& scales,
                         const std::optional<at::Tensor>& zeros, int64_t group_size) {
  TORCH_CHECK(qfrag.is_cuda() && qfrag.scalar_type() == at::kInt && qfrag.is_contiguous() &&
                  qfrag.dim() == 4 && qfrag.size(2) == 32 && qfrag.size(3) == 4,
              "qfrag must be a contiguous CUDA int32 [N/8, K/128, 32, 4] tensor");
  const int64_t n = qfrag.size(0) * 8, k = qfrag.size(1) * kStepK;
  TORCH_CHECK(group_size % kStepK == 0 && k % group_size == 0, "group_size ", group_size,
              " must be a multiple of 128 dividing in_features ", k);
  TORCH_CHECK(scales.scalar_type() == at::kHalf && scales.is_contiguous() && scales.dim() == 2 &&
                  scales.size(0) == k / group_size && scales.size(1) == n,
              "scales must be contiguous fp16 [groups, out]");
  if (zeros) {
    TORCH_CHECK(zeros->scalar_type() == at::kHalf && zeros->is_contiguous() &&
                    zeros->sizes() == scales.sizes(),
                "zeros must be contiguous fp16 shaped like scales");
  }
}


at::Tensor gptq_mma_gemm(const at::Tensor& x, const at::Tensor& qfrag, const at::Tensor& scales,
                         const std::optional<at::Tensor>& zeros,
                         const std::optional<at::Tensor>& bias, at::Tensor& workspace,
                         at::Tensor& counters, int64_t group_size, int64_t warps,
                         int64_t tiles_per_warp, int64_t steps_per_block) {
  check_frag(qfrag, scales, zeros, group_size);
  TORCH_CHECK(x.is_cuda() && x.scalar_type() == at::kHalf && x.dim() == 2 && x.stride(1) == 1 &&
                  x.stride(0) % 8 == 0 && x.size(1) == qfrag.size(1) * kStepK,
              "x must be fp16 [M, ", qfrag.size(1) * kStepK, "] with unit stride and 16-byte rows");
  TORCH_CHECK(x.size(0) >= 1 && x.size(0) <= 64, "mma gemm takes 1 to 64 rows, got ", x.size(0));
  TORCH_CHECK(workspace.scalar_type() == at::kFloat && counters.scalar_type() == at::kInt,
              "workspace must be fp32 and counters int32");
  const c10::cuda::CUDAGuard guard(x.device());
  auto out = at::empty({x.size(0), qfrag.size(0) * 8}, x.options());
  const half* z = zeros ? reinterpret_cast<const half*>(zeros->data_ptr<at::Half>()) : nullptr;
  const half* b = bias ? reinterpret_cast<const half*>(bias->data_ptr<at::Half>()) : nullptr;
  const int64_t m = x.size(0);
  if (m <= 16) {
    mma_config<1>(warps, tiles_per_warp, steps_per_block, x, qfrag, scales, z, b, out, workspace, counters, group_size);
  } else if (m <= 32) {
    mma_config<2>(warps, tiles_per_warp, steps_per_block, x, qfrag, scales, z, b, out, workspace, counters, group_size);
  } else {
    mma_config<4>(warps, tiles_per_warp, steps_per_block, x, qfrag, scales, z, b, out, workspace, counters, group_size);
  }
  return out;
}

at::Tensor gptq_frag_dequant(const at::Tensor& qfrag, const at::Tensor& scales,
                             const std::optional<at::Tensor>& zeros, int64_t group_size) {
  check_frag(qfrag, scales, zeros, group_size);
  const c10::cuda::CUDAGuard guard(qfrag.device());
  const int n = qfrag.size(0) * 8, k = qfrag.size(1) * kStepK;
  auto out = at::empty({n, k}, scales.options());
  const int threads = kDequantWarps * 32;
  const int64_t warps = int64_t(n / 8) * (k / kStepK);
  const int blocks = int((warps + kDequantWarps - 1) / kDequantWarps);
  auto stream = at::cuda::getCurrentCUDAStream();
  const auto* q = reinterpret_cast<const uint4*>(qfrag.data_ptr<int32_t>());
  const auto* s = reinterpret_cast<const half*>(scales.data_ptr<at::Half>());
  auto* o = reinterpret_cast<half*>(out.data_ptr<at::Half>());
  if (zeros) {
    frag_dequant_kernel<true><<<blocks, threads, 0, stream>>>(
        q, s, reinterpret_cast<const half*>(zeros->data_ptr<at::Half>()), o, n, k, int(group_size));
  } else {
    frag_dequant_kernel<false><<<blocks, threads, 0, stream>>>(q, s, nullptr, o, n, k, int(group_size));
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor gptq_frag_gemv(const at::Tensor& x, const at::Tensor& qfrag, const at::Tensor& scales,
                          const std::optional<at::Tensor>& zeros,
                          const std::optional<at::Tensor>& bias, int64_t group_size,
                          int64_t tiles_per_block, int64_t steps_per_warp) {
  check_frag(qfrag, scales, zeros, group_size);
  TORCH_CHECK(x.is_cuda() && x.scalar_type() == at::kHalf && x.dim() == 2 && x.stride(1) == 1 &&
                  x.stride(0) % 2 == 0 && x.size(1) == qfrag.size(1) * kStepK,
              "x must be fp16 [M, ", qfrag.size(1) * kStepK, "] with unit stride");
  TORCH_CHECK(x.size(0) >= 1 && x.size(0) <= 8, "frag gemv takes 1 to 8 rows, got ", x.size(0));
  TORCH_CHECK(tiles_per_block == 1 || tiles_per_block == 2, "tiles_per_block must be 1 or 2");
  const int steps_total = qfrag.size(1);
  const int warps = (steps_total + steps_per_warp - 1) / steps_per_warp;
  TORCH_CHECK(steps_per_warp >= 1 && warps <= 8, "steps_per_warp ", steps_per_warp, " leaves ",
              warps, " warps per block; at most 8");
  const c10::cuda::CUDAGuard guard(x.device());
  const int n = qfrag.size(0) * 8, k = steps_total * kStepK;
  auto out = at::empty({x.size(0), n}, x.options());
  const half* z = zeros ? reinterpret_cast<const half*>(zeros->data_ptr<at::Half>()) : nullptr;
  const half* b = bias ? reinterpret_cast<const half*>(bias->data_ptr<at::Half>()) : nullptr;
  auto stream = at::cuda::getCurrentCUDAStream();
  const auto* xp = reinterpret_cast<const half*>(x.data_ptr<at::Half>());
  const auto* q = reinterpret_cast<const uint4*>(qfrag.data_ptr<int32_t>());
  const auto* s = reinterpret_cast<const half*>(scales.data_ptr<at::Half>());
  auto* o = reinterpret_cast<half*>(out.data_ptr<at::Half>());
  const int m = x.size(0), xs = x.stride(0), gs = group_size, spw = steps_per_warp;
  const int nt = tiles_per_block, blocks = (n / 8 + nt - 1) / nt;
#define GPTQGW_FRAG_GEMV(M, NT)                                                                \
  {                                                                                          \
    const size_t smem = size_t(warps) * M * NT * 8 * sizeof(float);                          \
    z ? frag_gemv_kernel<M, NT, true><<<blocks, warps * 32, smem, stream>>>(xp, q, s, z, b, o, m, n, k, gs, xs, spw) \
      : frag_gemv_kernel<M, NT, false><<<blocks, warps * 32, smem, stream>>>(xp, q, s, z, b, o, m, n, k, gs, xs, spw); \
  }
#define GPTQGW_FRAG_GEMV_NT(M) \
  if (nt == 1) GPTQGW_FRAG_GEMV(M, 1) else GPTQGW_FRAG_GEMV(M, 2)
  if (m <= 1) GPTQGW_FRAG_GEMV_NT(1)
  else if (m <= 2) GPTQGW_FRAG_GEMV_NT(2)
  else if (m <= 4) GPTQGW_FRAG_GEMV_NT(4)
  else GPTQGW_FRAG_GEMV_NT(8)
#undef GPTQGW_FRAG_GEMV_NT
#undef GPTQGW_FRAG_GEMV
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}
