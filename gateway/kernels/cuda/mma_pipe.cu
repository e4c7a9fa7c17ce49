// 4-bit GPTQ matmul on tensor cores for 1 to 128 rows, pipelined over K (the fragment layout of
// gateway/kernels/mma_layout.py, the same weights as mma_gemm.cu).
//
// A block owns BM = WM * MT * 16 rows and BN = WN * NT * 8 output columns over a range of k128
// steps; its WM x WN warps each compute MT m16 tiles by NT n8 tiles. Every step's activations
// [BM, 128], weights (BN / 8 tiles of 512 bytes), scales and zeros go through a ring of kStages
// shared-memory buffers filled by cp.async, so the loads of later steps are in flight while the
// tensor cores work on the current one (mma_gemm.cu instead loads everything, then computes).
// Wide blocks matter at 64 rows: a block re-reads the activations for each BN columns it covers,
// and a warp re-reads them from shared memory for each NT tiles, so both costs fall with width.
//
// The grid's second axis splits K so that one wave fills the GPU (pipe_splits). Partial sums
// are added into the fp32 workspace; the last block of a column range (a counter) writes fp16 and
// leaves workspace and counter zeroed (finish_split_k in mma_ops.cuh).

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

constexpr int kStages = 4;
constexpr int kRowHalves = kStepK + kPadHalves;  // one staged activation row

template <int MT, int WM, int WN, int NT, bool HAS_ZEROS>
struct PipeShape {
  static constexpr int kThreads = WM * WN * 32;
  static constexpr int kRows = WM * MT * 16;
  static constexpr int kTiles = WN * NT;  // n8 tiles of a block
  static constexpr int kCols = kTiles * 8;
  // One stage: activations, weights, scales, zeros (bytes; each a multiple of 16).
  static constexpr int kABytes = kRows * kRowHalves * 2;
  static constexpr int kBBytes = kTiles * 512;
  static constexpr int kSBytes = kCols * 2;
  static constexpr int kStageBytes = kABytes + kBBytes + kSBytes * (HAS_ZEROS ? 2 : 1);
  static constexpr int kSmemBytes = kStages * kStageBytes;
};

template <int MT, int WM, int WN, int NT, bool HAS_ZEROS>
__global__ void __launch_bounds__(WM * WN * 32) mma_pipe_kernel(
    const half* __restrict__ x, const uint4* __restrict__ qfrag, const half* __restrict__ scales,
    const half* __restrict__ zeros, const half* __restrict__ bias, half* __restrict__ out,
    float* __restrict__ workspace, int* __restrict__ counters, int m_rows, int n, int k,
    int group_size, int x_stride, int steps_per_split) {
  using S = PipeShape<MT, WM, WN, NT, HAS_ZEROS>;
  extern __shared__ __align__(16) unsigned char smem[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wm = warp / WN, wn = warp % WN;
  const int steps_total = k / kStepK;
  const int step0 = blockIdx.y * steps_per_split;
  const int nsteps = min(steps_per_split, steps_total - step0);
  const int ntiles = n / 8;
  const int tile0 = blockIdx.x * S::kTiles;

  // Issue the copies of step `s` (of this block's range) into ring slot `slot`.
  auto load_stage = [&](int slot, int s) {
    unsigned char* base = smem + slot * S::kStageBytes;
    half* as = reinterpret_cast<half*>(base);
    uint4* bs = reinterpret_cast<uint4*>(base + S::kABytes);
    half* ss = reinterpret_cast<half*>(base + S::kABytes + S::kBBytes);
    const int step = step0 + s;
    // Rows past m_rows are zero-filled: their products land in rows that are never stored.
    for (int i = threadIdx.x; i < S::kRows * 16; i += S::kThreads) {
      const int r = i / 16, c = i % 16;
      const bool valid = r < m_rows;
      const half* src = x + (valid ? size_t(r) * x_stride + step * kStepK + c * 8 : 0);
      copy_async_16_or_zero(as + r * kRowHalves + c * 8, src, valid);
    }
    for (int i = threadIdx.x; i < S::kTiles * 32; i += S::kThreads) {
      const int t = i / 32, l = i % 32;
      const bool valid = tile0 + t < ntiles;
      const uint4* src = qfrag + (valid ? (size_t(tile0 + t) * steps_total + step) * 32 + l : 0);
      copy_async_16_or_zero(bs + i, src, valid);
    }
    // A tile's 8 scales (and zeros) are one 16-byte run of the group's row.
    const size_t group_row = size_t(step * kStepK / group_size) * n;
    for (int t = threadIdx.x; t < S::kTiles * (HAS_ZEROS ? 2 : 1); t += S::kThreads) {
      const int tile = t % S::kTiles;
      const bool valid = tile0 + tile < ntiles;
      const half* src = (t < S::kTiles ? scales : zeros) + (valid ? group_row + (tile0 + tile) * 8 : 0);
      copy_async_16_or_zero(ss + t * 8, src, valid);
    }
  };

  float acc[MT][NT][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int t = 0; t < NT; ++t)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[mt][t][j] = 0.f;

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < nsteps) load_stage(s, s);
    asm volatile("cp.async.commit_group;\n" ::);
  }

  const int a_row = lane % 16, a_col = (lane / 16) * 8;
  const int row_base = wm * MT * 16;
  // A warp whose rows are all past m_rows skips the products (one warp-uniform branch around the
  // step, not one per m16 tile: a branch between the ldmatrix and its mmas serialises them).
  const bool warp_has_rows = row_base < m_rows;
  const half2 sym_zero = __float2half2_rn(1024.f + 8.f);
  for (int s = 0; s < nsteps; ++s) {
    // Step s's group is complete once at most kStages - 2 younger groups are pending; the barrier
    // also tells everyone that slot (s - 1) % kStages, read last iteration, may be refilled.
    asm volatile("cp.async.wait_group %0;\n" ::"n"(kStages - 2));
    __syncthreads();
    if (s + kStages - 1 < nsteps) load_stage((s + kStages - 1) % kStages, s + kStages - 1);
    asm volatile("cp.async.commit_group;\n" ::);
    if (!warp_has_rows) continue;

    const unsigned char* base = smem + (s % kStages) * S::kStageBytes;
    const half* as = reinterpret_cast<const half*>(base) + (row_base + a_row) * kRowHalves + a_col;
    const uint4* bs = reinterpret_cast<const uint4*>(base + S::kABytes);
    const half* ss = reinterpret_cast<const half*>(base + S::kABytes + S::kBBytes);
    // Each word is read from shared memory when its slices come up (holding a whole uint4 per tile
    // would cost 4 * NT registers).
    const uint32_t* words = reinterpret_cast<const uint32_t*>(bs + wn * NT * 32 + lane);
    half2 scale[NT], zero1024[NT];
#pragma unroll
    for (int t = 0; t < NT; ++t) {
      const int tile = wn * NT + t;
      scale[t] = __half2half2(ss[tile * 8 + lane / 4]);
      zero1024[t] = HAS_ZEROS ? __float2half2_rn(1024.f + __half2float(ss[S::kCols + tile * 8 + lane / 4]))
                              : sym_zero;
    }
    // The 8 k16 slices of the step; slice j + 1's A fragments load while slice j's mmas run.
    uint32_t a[2][MT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) ldmatrix_x4(a[0][mt], as + mt * 16 * kRowHalves);
    uint32_t b[NT][4];
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      if (j + 1 < 8) {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
          ldmatrix_x4(a[(j + 1) % 2][mt], as + mt * 16 * kRowHalves + (j + 1) * 16);
      }
      if (j % 2 == 0) {  // slices 2wd and 2wd + 1 share word wd of each tile
#pragma unroll
        for (int t = 0; t < NT; ++t) {
          const uint32_t word = words[t * 32 * 4 + j / 2];
#pragma unroll
          for (int i = 0; i < 4; ++i) b[t][i] = dequant_pair(word, i, zero1024[t], scale[t]);
        }
      }
      const int ks = j % 2;
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int t = 0; t < NT; ++t) mma_16816(acc[mt][t], a[j % 2][mt], b[t][2 * ks], b[t][2 * ks + 1]);
    }
  }
  asm volatile("cp.async.wait_group 0;\n" ::);

  const bool split = gridDim.y > 1;
  store_or_add_tiles(acc, row_base, tile0 + wn * NT, ntiles, m_rows, n, split, bias, out, workspace);
  if (split) finish_split_k(workspace, counters, bias, out, m_rows, n, tile0 * 8, S::kCols);
}

// K splits for one wave: the fewest splits that minimise waves x (steps per split + the cost of
// the split-K reduction, about two steps' worth of memory traffic).
int pipe_splits(int col_blocks, int steps, int resident_blocks, int64_t forced) {
  if (forced > 0) return int(std::min<int64_t>(forced, steps));
  int best = 1;
  int64_t best_cost = -1;
  for (int splits = 1; splits <= steps; ++splits) {
    const int per_split = (steps + splits - 1) / splits;
    if ((steps + per_split - 1) / per_split != splits) continue;  // same as fewer splits
    const int64_t waves = (int64_t(col_blocks) * splits + resident_blocks - 1) / resident_blocks;
    const int64_t cost = waves * (per_split + (splits > 1 ? 2 : 0));
    if (best_cost < 0 || cost < best_cost) best = splits, best_cost = cost;
  }
  return best;
}

template <int MT, int WM, int WN, int NT, bool HAS_ZEROS>
void launch_pipe(const at::Tensor& x, const at::Tensor& qfrag, const at::Tensor& scales,
                 const half* zeros, const half* bias, at::Tensor& out, at::Tensor& workspace,
                 at::Tensor& counters, int64_t group_size, int64_t forced_splits) {
  using S = PipeShape<MT, WM, WN, NT, HAS_ZEROS>;
  TORCH_CHECK(x.size(0) <= S::kRows, "this mma_pipe config takes at most ", S::kRows, " rows");
  auto kernel = mma_pipe_kernel<MT, WM, WN, NT, HAS_ZEROS>;
  static int resident = 0;  // blocks per SM, per instantiation (and, as served, per device)
  if (resident == 0) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, S::kSmemBytes));
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&resident, kernel, S::kThreads, S::kSmemBytes));
    TORCH_CHECK(resident > 0, "mma_pipe config does not fit on an SM");
  }
  const int n = qfrag.size(0) * 8, steps = qfrag.size(1);
  const int col_blocks = (n / 8 + S::kTiles - 1) / S::kTiles;
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int splits_wanted = pipe_splits(col_blocks, steps, sms * resident, forced_splits);
  const int per_split = (steps + splits_wanted - 1) / splits_wanted;
  const int splits = (steps + per_split - 1) / per_split;
  TORCH_CHECK(splits == 1 || (workspace.numel() >= x.size(0) * n && counters.numel() >= col_blocks),
              "mma_pipe workspace too small: ", workspace.numel(), " floats and ", counters.numel(),
              " counters for ", x.size(0), " x ", n, " outputs in ", col_blocks, " column blocks");
  kernel<<<dim3(col_blocks, splits), S::kThreads, S::kSmemBytes, at::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const half*>(x.data_ptr<at::Half>()),
      reinterpret_cast<const uint4*>(qfrag.data_ptr<int32_t>()),
      reinterpret_cast<const half*>(scales.data_ptr<at::Half>()), zeros, bias,
      reinterpret_cast<half*>(out.data_ptr<at::Half>()), workspace.data_ptr<float>(),
      counters.data_ptr<int32_t>(), int(x.size(0)), n, int(steps) * kStepK, int(group_size),
      int(x.stride(0)), per_split);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The compiled configurations (m16 tiles per warp, warps along M, warps along N, n8 tiles per warp);
// gateway/kernels/cuda_ext.py PIPE_CONFIGS lists the same.
#define GPTQGW_PIPE_CONFIGS(X) \
  X(1, 1, 4, 8) X(1, 1, 8, 4) X(2, 1, 4, 8) X(2, 1, 8, 4) X(2, 2, 4, 8) X(4, 1, 8, 4) \
  X(2, 2, 4, 4) X(4, 2, 4, 8) X(4, 2, 4, 4) X(2, 4, 2, 8)

}  // namespace

at::Tensor gptq_mma_pipe(const at::Tensor& x, const at::Tensor& qfrag, const at::Tensor& scales,
                         const std::optional<at::Tensor>& zeros,
                         const std::optional<at::Tensor>& bias, at::Tensor& workspace,
                         at::Tensor& counters, int64_t group_size, int64_t m_tiles,
                         int64_t warps_m, int64_t warps_n, int64_t tiles_per_warp, int64_t splits) {
  check_frag(qfrag, scales, zeros, group_size);
  TORCH_CHECK(x.is_cuda() && x.scalar_type() == at::kHalf && x.dim() == 2 && x.stride(1) == 1 &&
                  x.stride(0) % 8 == 0 && x.size(1) == qfrag.size(1) * kStepK &&
                  reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0,
              "x must be fp16 [M, ", qfrag.size(1) * kStepK, "] with unit stride and 16-byte rows");
  TORCH_CHECK(x.size(0) >= 1, "mma_pipe takes at least one row");
  TORCH_CHECK(workspace.scalar_type() == at::kFloat && counters.scalar_type() == at::kInt,
              "workspace must be fp32 and counters int32");
  const c10::cuda::CUDAGuard guard(x.device());
  auto out = at::empty({x.size(0), qfrag.size(0) * 8}, x.options());
  const half* z = zeros ? reinterpret_cast<const half*>(zeros->data_ptr<at::Half>()) : nullptr;
  const half* b = bias ? reinterpret_cast<const half*>(bias->data_ptr<at::Half>()) : nullptr;
#define GPTQGW_PIPE_CASE(MT, WM, WN, NT)                                                          \
  if (m_tiles == MT && warps_m == WM && warps_n == WN && tiles_per_warp == NT) {                 \
    z ? launch_pipe<MT, WM, WN, NT, true>(x, qfrag, scales, z, b, out, workspace, counters, group_size, splits) \
      : launch_pipe<MT, WM, WN, NT, false>(x, qfrag, scales, z, b, out, workspace, counters, group_size, splits); \
    return out;                                                                                   \
  }
  GPTQGW_PIPE_CONFIGS(GPTQGW_PIPE_CASE)
#undef GPTQGW_PIPE_CASE
  TORCH_CHECK(false, "mma_pipe config (m_tiles, warps_m, warps_n, tiles_per_warp) = (", m_tiles,
              ", ", warps_m, ", ", warps_n, ", ", tiles_per_warp, ") is not a compiled one");
}
