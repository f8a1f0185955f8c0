// 2:4 sparse linear on the sparse tensor cores: y [M, N] = x [M, K] @ W^T + bias, with
// mma.sp.sync.aligned.m16n8k32.row.col.f32.{f16,bf16} (inline PTX, sm_80 and newer).
//
// W [N, K] is 2:4 sparse in the N:M format: Kp = K rounded up to a multiple of 4,
// Kc = Kp / 2; values [N, Kc] holds, for row r and group g (dense columns 4g..4g+3), its 2
// kept values at values[r, 2g], values[r, 2g+1] in increasing column order; meta int32
// [N, ceil(Kc / 16)] holds their positions in the group, 2 bits each, LSB first: word w of
// row r covers groups 8w..8w+7 (dense columns 32w..32w+31), group 8w+j in bits 4j..4j+3
// (first index in the low 2 bits). That is the per-row encoding mma.sp reads.
//
// The product is computed transposed, y^T = W @ x^T, so that W is the sparse operand A
// (16 weight rows per mma) and x^T is B (8 tokens per mma, x's rows being B's columns:
// "col" layout). Accumulation is in fp32; bias is added in fp32 before the one rounding.
//
// Tiling: a block of 4 warps computes 64 weight rows x 64 tokens; warp w takes weight rows
// 32 * (w / 2) .. +32 (two m16 tiles) and tokens 32 * (w % 2) .. +32 (four n8 tiles). Each
// step of the K loop covers 32 dense columns (16 compressed ones), and each warp issues
// 2 x 4 mma.sp per step.
//
// Staging: the block's tiles of a step (values [64 rows, 16], x [64 tokens, 32] and the 64
// rows' metadata words) are copied to shared memory by the whole block in STAGES buffers,
// STAGES - 1 steps ahead of the mma.sp (a cp.async pipeline): thread i copies 16 bytes of
// values (row i / 2, compressed columns 8 (i % 2) ..), 2 x 16 bytes of x (chunk c = i and
// i + 128: token c / 4, columns 8 (c % 4) ..) and, for i < 64, row i's metadata word. A 16-
// byte chunk goes by one cp.async (zero-filled past the row's end: N, Kc, M, K) where its
// rows are 16-byte aligned (values with Kc % 8 == 0, x with K % 8 == 0, and aligned
// pointers), else by plain loads and a shared store. Fragments are read from the staged tiles
// (rows padded by 16 bytes: the 32-bit reads of a warp hit 32 distinct banks), as coalesced
// 16-byte global loads replace the scattered 4-byte ones.
//
// Fragments, per lane (groupID g = lane / 4, threadID_in_group t = lane % 4), for the k step
// starting at dense column k0 and the m16 tile whose first weight row is r0 (global indices;
// the staged tiles hold them at row - the block's first row, column - k0 / 2 or - k0):
//   A (compressed 16 x 16 tile, the layout of dense mma.m16n8k16's A): register j (0..3) holds
//     values[r0 + g + 8 * (j & 1), k0 / 2 + 2 t + 8 * (j >> 1) + {0, 1}] (low half first):
//     the 2 kept values of dense group k0 / 4 + t + 4 * (j >> 1).
//   metadata, sparsity selector 0 (threads t = 0 and 1 of each quad supply it): thread t holds
//     16-bit half t of meta[r0 + g, k0 / 32] in its low 16 bits and half t of
//     meta[r0 + g + 8, k0 / 32] in its high 16 bits: row g's and row g + 8's groups
//     4t .. 4t + 3 of the 32-column step, one nibble each.
//   B (x^T, 32 x 8): register j (0..3) holds x[n0 + g, k0 + 2 t + 8 j + {0, 1}] for the n8 tile
//     whose first token is n0.
//   D (16 x 8, fp32): d[q] is weight row r0 + g + 8 * (q >> 1), token n0 + 2 t + (q & 1).
// tests/test_cupy.py mirrors this index math in Python and checks it against the PTX ISA's
// description of the fragments on the CPU.
//
// Out-of-range weight rows, compressed columns past Kc and dense columns past K load as 0;
// metadata nibbles of groups past Kp and of rows past N become 0b0100 (positions 0 and 1),
// since mma.sp leaves 0b0000, 0b0101, 0b1010 and 0b1111 undefined.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

// The metadata holds each group's positions in increasing order, so ::ordered_metadata (PTX
// 8.5, CUDA 12.5; ptxas advises it for future architectures) means the same as plain .sp.
#if __CUDACC_VER_MAJOR__ > 12 || (__CUDACC_VER_MAJOR__ == 12 && __CUDACC_VER_MINOR__ >= 5)
#define MMA_SP "mma.sp::ordered_metadata"
#else
#define MMA_SP "mma.sp"
#endif

namespace {

constexpr int THREADS = 128;
constexpr int BLOCK_ROWS = 64;     // weight rows per block
constexpr int BLOCK_TOKENS = 64;   // tokens per block
constexpr int WARP_ROWS = 32;      // two m16 tiles
constexpr int WARP_TOKENS = 32;    // four n8 tiles
constexpr int K_STEP = 32;         // dense columns per mma.sp
constexpr int KC_STEP = K_STEP / 2;  // compressed columns per mma.sp
constexpr int STAGES = 3;          // staged steps: STAGES - 1 in flight while one is computed
constexpr int CHUNK = 8;           // 16-bit elements per 16-byte copy
constexpr int V_PITCH = KC_STEP + CHUNK;  // staged row pitches (elements): 48 and 80 bytes
constexpr int X_PITCH = K_STEP + CHUNK;
constexpr unsigned VALID_NIBBLES = 0x44444444u;

// One step's staged tiles (8.25 KB).
struct Stage {
  unsigned short values[BLOCK_ROWS][V_PITCH];
  unsigned short x[BLOCK_TOKENS][X_PITCH];
  unsigned meta[BLOCK_ROWS];
};

__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

template <typename T> struct MmaSp;

template <> struct MmaSp<__half> {
  static __device__ __forceinline__ void run(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[4],
                                             unsigned e) {
    asm volatile(
        MMA_SP ".sync.aligned.m16n8k32.row.col.f32.f16.f16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9, %10, %11}, {%0, %1, %2, %3}, %12, 0x0;\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "r"(e));
  }
};

template <> struct MmaSp<__nv_bfloat16> {
  static __device__ __forceinline__ void run(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[4],
                                             unsigned e) {
    asm volatile(
        MMA_SP ".sync.aligned.m16n8k32.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9, %10, %11}, {%0, %1, %2, %3}, %12, 0x0;\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "r"(e));
  }
};

// Two consecutive 16-bit elements p[0], p[1] in one register, p[0] in the low half.
__device__ __forceinline__ unsigned load_pair(const unsigned short* p) {
  return *reinterpret_cast<const unsigned*>(p);
}

__device__ __forceinline__ unsigned shared_address(const void* p) {
  unsigned address;
  asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(address) : "l"(p));
  return address;
}

// cp.async of `bytes` bytes of src (4 or 16: BYTES) to shared dst, zero-filling the rest
// (valid = 0: nothing read).
template <int BYTES>
__device__ __forceinline__ void cp_async(void* dst, const void* src, int valid) {
  if (BYTES == 16) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_address(dst)), "l"(src), "r"(valid));
  } else {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(shared_address(dst)), "l"(src), "r"(valid));
  }
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int PENDING>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(PENDING)); }

// Elements [col, col + CHUNK) of row `row` (stride `pitch`) of src to shared dst (16-byte
// aligned); those past (rows, cols) as 0. By one cp.async where `async` (row starts 16-byte
// aligned), else by plain loads.
__device__ __forceinline__ void stage_chunk(unsigned short* dst, const unsigned short* __restrict__ src, int row,
                                            int col, int rows, int cols, int pitch, bool async) {
  const int valid = row < rows ? max(0, min(CHUNK, cols - col)) : 0;
  const unsigned short* from = src + static_cast<long long>(row) * pitch + col;
  if (async) {
    cp_async<16>(dst, valid > 0 ? from : src, 2 * valid);
    return;
  }
  unsigned w[CHUNK / 2];
#pragma unroll
  for (int e = 0; e < CHUNK; e += 2)
    w[e / 2] = (e < valid ? from[e] : 0u) | (e + 1 < valid ? static_cast<unsigned>(from[e + 1]) << 16 : 0u);
  *reinterpret_cast<uint4*>(dst) = make_uint4(w[0], w[1], w[2], w[3]);
}

// Step k0's tiles of the block (weight rows from row0, tokens from token0) into `stage`.
__device__ __forceinline__ void stage_step(Stage& stage, const unsigned short* __restrict__ x,
                                           const unsigned short* __restrict__ values,
                                           const unsigned* __restrict__ meta, int row0, int token0, int k0, int M,
                                           int N, int K, int Kc, int meta_words, bool values_async, bool x_async) {
  const int i = threadIdx.x;
  const int vc = (i % 2) * CHUNK;
  stage_chunk(&stage.values[i / 2][vc], values, row0 + i / 2, k0 / 2 + vc, N, Kc, Kc, values_async);
#pragma unroll
  for (int c = i; c < BLOCK_TOKENS * K_STEP / CHUNK; c += THREADS) {
    const int xc = (c % 4) * CHUNK;
    stage_chunk(&stage.x[c / 4][xc], x, token0 + c / 4, k0 + xc, M, K, K, x_async);
  }
  if (i < BLOCK_ROWS) {
    const int row = row0 + i;
    cp_async<4>(&stage.meta[i], row < N ? meta + static_cast<long long>(row) * meta_words + k0 / K_STEP : meta,
                row < N ? 4 : 0);
  }
}

// Row `row`'s staged metadata word for the k step at k0, its nibbles past Kp made valid;
// rows past N get valid nibbles only.
__device__ __forceinline__ unsigned meta_word(unsigned word, int row, int N, int k0, int Kp) {
  if (row >= N) return VALID_NIBBLES;
  const int groups = (Kp - k0) / 4;
  if (groups >= 8) return word;
  const unsigned kept = (1u << (4 * groups)) - 1;
  return (word & kept) | (VALID_NIBBLES & ~kept);
}

template <typename T>
__device__ __forceinline__ void nm24_linear(const unsigned short* __restrict__ x,
                                            const unsigned short* __restrict__ values,
                                            const unsigned* __restrict__ meta, const T* __restrict__ bias,
                                            T* __restrict__ y, int M, int N, int K, int Kc, int meta_words) {
  __shared__ __align__(16) Stage stages[STAGES];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int row0 = blockIdx.x * BLOCK_ROWS, token0 = blockIdx.y * BLOCK_TOKENS;
  const int warp_row = (warp >> 1) * WARP_ROWS, warp_token = (warp & 1) * WARP_TOKENS;
  const int row_base = row0 + warp_row;
  const int token_base = token0 + warp_token;
  const int Kp = 2 * Kc;
  const int steps = (Kp + K_STEP - 1) / K_STEP;
  // 16-byte copies need 16-byte aligned rows.
  const bool values_async = Kc % CHUNK == 0 && (reinterpret_cast<unsigned long long>(values) & 15) == 0;
  const bool x_async = K % CHUNK == 0 && (reinterpret_cast<unsigned long long>(x) & 15) == 0;

  float acc[2][4][4];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int jn = 0; jn < 4; ++jn)
#pragma unroll
      for (int q = 0; q < 4; ++q) acc[i][jn][q] = 0.f;

#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < steps)
      stage_step(stages[s], x, values, meta, row0, token0, s * K_STEP, M, N, K, Kc, meta_words, values_async,
                 x_async);
    cp_async_commit();
  }
  for (int step = 0; step < steps; ++step) {
    cp_async_wait<STAGES - 2>();  // step's copies have landed (this thread's) ...
    __syncthreads();              // ... and every thread's; the buffer of step - 1 is free
    const int ahead = step + STAGES - 1;
    if (ahead < steps)
      stage_step(stages[ahead % STAGES], x, values, meta, row0, token0, ahead * K_STEP, M, N, K, Kc, meta_words,
                 values_async, x_async);
    cp_async_commit();

    const Stage& stage = stages[step % STAGES];
    const int k0 = step * K_STEP;
    unsigned a[2][4], e[2], b[4][4];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int r = warp_row + 16 * i + g;  // staged row of r0 + g
#pragma unroll
      for (int j = 0; j < 4; ++j) a[i][j] = load_pair(&stage.values[r + 8 * (j & 1)][2 * t + 8 * (j >> 1)]);
      const unsigned lo = meta_word(stage.meta[r], row0 + r, N, k0, Kp);
      const unsigned hi = meta_word(stage.meta[r + 8], row0 + r + 8, N, k0, Kp);
      e[i] = t == 0 ? (lo & 0xffffu) | (hi << 16) : (lo >> 16) | (hi & 0xffff0000u);
    }
#pragma unroll
    for (int jn = 0; jn < 4; ++jn)
#pragma unroll
      for (int j = 0; j < 4; ++j) b[jn][j] = load_pair(&stage.x[warp_token + 8 * jn + g][2 * t + 8 * j]);
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int jn = 0; jn < 4; ++jn) MmaSp<T>::run(acc[i][jn], a[i], b[jn], e[i]);
  }

#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int row = row_base + 16 * i + g + 8 * (q >> 1);
      if (row >= N) continue;
      const float shift = bias != nullptr ? to_float(bias[row]) : 0.f;
#pragma unroll
      for (int jn = 0; jn < 4; ++jn) {
        const int token = token_base + 8 * jn + 2 * t + (q & 1);
        if (token < M) y[static_cast<long long>(token) * N + row] = from_float<T>(acc[i][jn][q] + shift);
      }
    }
}

}  // namespace

// grid = (cdiv(N, 64), cdiv(M, 64)), block = 128. x [M, K], values [N, Kc] and meta
// [N, meta_words] contiguous; bias [N] or null; y [M, N] contiguous.
#define NM24_ENTRY(NAME, T)                                                                                  \
  extern "C" __global__ void __launch_bounds__(THREADS)                                                     \
      NAME(const unsigned short* x, const unsigned short* values, const unsigned* meta, const T* bias, T* y, \
           int M, int N, int K, int Kc, int meta_words) {                                                   \
    nm24_linear<T>(x, values, meta, bias, y, M, N, K, Kc, meta_words);                                       \
  }

NM24_ENTRY(nm24_linear_f16, __half)
NM24_ENTRY(nm24_linear_bf16, __nv_bfloat16)
