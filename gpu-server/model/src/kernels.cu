// kvmesh's decode kernels for candle's CUDA backend (the `cuda` feature; built to PTX by
// build.rs). A decode step on a GPU is a few matrix-vector products over the weights and a
// long tail of small element-wise ops; launched one candle op at a time the tail costs more
// than the weights take to stream. These fuse that tail: one kernel per step of a layer.
//
// Every kernel takes contiguous row-major inputs, computes in f32, and comes in an f16 and an
// f32 flavour (the activations' type). The KV pool is always f16 rows `(R, kv_heads * head_dim)`.

#include <cuda_fp16.h>
#include <stdint.h>

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half(x); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// 16 bytes of weights, read once: not kept in L1.
__device__ __forceinline__ uint4 load_stream(const uint4* p) {
  uint4 r;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
               : "l"(p));
  return r;
}

// y (B, N) = x (B, K) . w (N, K)^T for a handful of rows B: one warp per output column, the
// weight row read once in 16-byte loads for all B inputs. K is a multiple of 16 / sizeof(T).
template <typename T, int B>
__device__ void gemv(const T* __restrict__ x, const T* __restrict__ w, T* __restrict__ y,
                     int n, int k) {
  const int lane = threadIdx.x & 31;
  const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (row >= n) return;
  constexpr int V = 16 / sizeof(T);
  const uint4* wr = reinterpret_cast<const uint4*>(w + (size_t)row * k);
  float acc[B];
#pragma unroll
  for (int b = 0; b < B; b++) acc[b] = 0.f;
  const int nv = k / V;
#pragma unroll 4
  for (int i = lane; i < nv; i += 32) {
    const uint4 wv = load_stream(wr + i);
    const T* wt = reinterpret_cast<const T*>(&wv);
#pragma unroll
    for (int b = 0; b < B; b++) {
      const uint4 xv = __ldg(reinterpret_cast<const uint4*>(x + (size_t)b * k) + i);
      const T* xt = reinterpret_cast<const T*>(&xv);
#pragma unroll
      for (int j = 0; j < V; j++) acc[b] += to_f(wt[j]) * to_f(xt[j]);
    }
  }
#pragma unroll
  for (int b = 0; b < B; b++) {
    const float s = warp_sum(acc[b]);
    if (lane == 0) y[(size_t)b * n + row] = from_f<T>(s);
  }
}

// The gated unit of the MLP straight from the fused gate|up weight `w (2F, K)`:
// y (B, F) = silu(x . w[i]) * (x . w[F + i]), a warp per i reading both rows; no (B, 2F)
// intermediate and no separate silu kernel. Rounded through T where candle's ops would round.
template <typename T, int B>
__device__ void gemv_glu(const T* __restrict__ x, const T* __restrict__ w, T* __restrict__ y,
                         int f, int k) {
  const int lane = threadIdx.x & 31;
  const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (row >= f) return;
  constexpr int V = 16 / sizeof(T);
  const uint4* wg = reinterpret_cast<const uint4*>(w + (size_t)row * k);
  const uint4* wu = reinterpret_cast<const uint4*>(w + (size_t)(f + row) * k);
  float ag[B], au[B];
#pragma unroll
  for (int b = 0; b < B; b++) ag[b] = au[b] = 0.f;
  const int nv = k / V;
#pragma unroll 4
  for (int i = lane; i < nv; i += 32) {
    const uint4 gv = load_stream(wg + i);
    const uint4 uv = load_stream(wu + i);
    const T* gt = reinterpret_cast<const T*>(&gv);
    const T* ut = reinterpret_cast<const T*>(&uv);
#pragma unroll
    for (int b = 0; b < B; b++) {
      const uint4 xv = __ldg(reinterpret_cast<const uint4*>(x + (size_t)b * k) + i);
      const T* xt = reinterpret_cast<const T*>(&xv);
#pragma unroll
      for (int j = 0; j < V; j++) {
        ag[b] += to_f(gt[j]) * to_f(xt[j]);
        au[b] += to_f(ut[j]) * to_f(xt[j]);
      }
    }
  }
#pragma unroll
  for (int b = 0; b < B; b++) {
    const float g = to_f(from_f<T>(warp_sum(ag[b])));
    const float u = to_f(from_f<T>(warp_sum(au[b])));
    const float sg = to_f(from_f<T>(g / (1.f + __expf(-g))));
    if (lane == 0) y[(size_t)b * f + row] = from_f<T>(sg * u);
  }
}

// The fused q|k|v projection with rope and the KV write in its epilogue, for B tokens:
// `w ((H + 2 KH) D, K)`; a warp per rotated pair of one head (`(i, i + D / 2)`, or `(2i, 2i + 1)`
// when interleaved) computes both rows for every token, rotates q and k by the token's
// `cos`/`sin (B, D / 2)`, and writes q to `q_out (B, H D)`, k and v into the pool at
// `rows[t] + shift` and `rows[B + t] + shift`. Rounded through T where candle's ops would round.
template <typename T, int B>
__device__ void gemv_qkv_rope(const T* __restrict__ x, const T* __restrict__ w,
                              const T* __restrict__ cos, const T* __restrict__ sin,
                              T* __restrict__ q_out, __half* __restrict__ pool,
                              const uint32_t* __restrict__ rows, int k, int heads, int kv_heads,
                              int d, int interleaved) {
  const int lane = threadIdx.x & 31;
  const int pair = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  const int half = d / 2;
  if (pair >= (heads + 2 * kv_heads) * half) return;
  const int head = pair / half, i = pair % half;
  const int i0 = interleaved ? 2 * i : i, i1 = interleaved ? 2 * i + 1 : i + half;
  constexpr int V = 16 / sizeof(T);
  const uint4* w0 = reinterpret_cast<const uint4*>(w + ((size_t)head * d + i0) * k);
  const uint4* w1 = reinterpret_cast<const uint4*>(w + ((size_t)head * d + i1) * k);
  float a0[B], a1[B];
#pragma unroll
  for (int b = 0; b < B; b++) a0[b] = a1[b] = 0.f;
  const int nv = k / V;
#pragma unroll 4
  for (int v = lane; v < nv; v += 32) {
    const uint4 r0 = load_stream(w0 + v);
    const uint4 r1 = load_stream(w1 + v);
    const T* t0 = reinterpret_cast<const T*>(&r0);
    const T* t1 = reinterpret_cast<const T*>(&r1);
#pragma unroll
    for (int b = 0; b < B; b++) {
      const uint4 xv = __ldg(reinterpret_cast<const uint4*>(x + (size_t)b * k) + v);
      const T* xt = reinterpret_cast<const T*>(&xv);
#pragma unroll
      for (int j = 0; j < V; j++) {
        a0[b] += to_f(t0[j]) * to_f(xt[j]);
        a1[b] += to_f(t1[j]) * to_f(xt[j]);
      }
    }
  }
  const size_t kv_dim = (size_t)kv_heads * d;
#pragma unroll
  for (int b = 0; b < B; b++) {
    float p = to_f(from_f<T>(warp_sum(a0[b])));
    float q = to_f(from_f<T>(warp_sum(a1[b])));
    if (lane != 0) continue;
    if (head < heads + kv_heads) {
      const float c = to_f(cos[(size_t)b * half + i]), s = to_f(sin[(size_t)b * half + i]);
      const float rp = p * c - q * s, rq = p * s + q * c;
      p = rp;
      q = rq;
    }
    if (head < heads) {
      T* dst = q_out + (size_t)b * heads * d + (size_t)head * d;
      dst[i0] = from_f<T>(p);
      dst[i1] = from_f<T>(q);
    } else {
      const bool is_k = head < heads + kv_heads;
      const int kh = is_k ? head - heads : head - heads - kv_heads;
      __half* dst = pool + (size_t)rows[is_k ? b : B + b] * kv_dim + (size_t)kh * d;
      dst[i0] = __float2half(to_f(from_f<T>(p)));
      dst[i1] = __float2half(to_f(from_f<T>(q)));
    }
  }
}

// One token's q, k and v heads (a row of the fused projection `(T, (H + 2 KH) D)`): q and k
// rotated by the token's cos/sin `(T, D / 2)`; q to `q_out (T, H D)`, k and v into the pool at
// `rows[t]` and `rows[T + t]`. Block (t, head); a thread per rotated pair.
template <typename T>
__device__ void rope_write(const T* __restrict__ qkv, const T* __restrict__ cos,
                           const T* __restrict__ sin, T* __restrict__ q_out,
                           __half* __restrict__ pool, const uint32_t* __restrict__ rows,
                           int tokens, int heads, int kv_heads, int d, int interleaved) {
  const int t = blockIdx.x, head = blockIdx.y, half = d / 2;
  const T* src = qkv + (size_t)t * (heads + 2 * kv_heads) * d + (size_t)head * d;
  const size_t kv_dim = (size_t)kv_heads * d;
  for (int i = threadIdx.x; i < half; i += blockDim.x) {
    const int i0 = interleaved ? 2 * i : i, i1 = interleaved ? 2 * i + 1 : i + half;
    float a = to_f(src[i0]), b = to_f(src[i1]);
    if (head < heads + kv_heads) {
      const float c = to_f(cos[(size_t)t * half + i]), s = to_f(sin[(size_t)t * half + i]);
      const float ra = a * c - b * s, rb = a * s + b * c;
      a = ra;
      b = rb;
    }
    if (head < heads) {
      T* dst = q_out + (size_t)t * heads * d + (size_t)head * d;
      dst[i0] = from_f<T>(a);
      dst[i1] = from_f<T>(b);
    } else {
      const bool is_k = head < heads + kv_heads;
      const int kh = is_k ? head - heads : head - heads - kv_heads;
      __half* dst = pool + (size_t)rows[is_k ? t : tokens + t] * kv_dim + (size_t)kh * d;
      // Through T first: the pool holds what the unfused path would have written.
      dst[i0] = __float2half(to_f(from_f<T>(a)));
      dst[i1] = __float2half(to_f(from_f<T>(b)));
    }
  }
}

// Attention of one query token per sequence over its paged context, split over the context in
// chunks of CHUNK positions so that a long context spreads over many blocks.
// q `(B, H D)`; `gather (2, B, C)`: the pool rows of each sequence's K then V at positions
// `0..C` (padded to the longest); `lens (B)` the real context lengths. Block (kv head,
// sequence, chunk) serves the kv head's g = H / KH query heads, reading each K and V row once:
// a thread per position for the scores, a thread per pair of dims for the weighted sum of V.
// With one chunk it writes `out (B, H D)`; otherwise `part (B, KH, chunks, g, D + 2)` (max,
// sum, unnormalized output in f32) for attention_merge. D is even, at most 256; g at most 8.
constexpr int CHUNK = 256;
constexpr int MAXG = 8;

template <typename T>
__device__ void attention_chunk(const T* __restrict__ q, const __half* __restrict__ pool,
                                const uint32_t* __restrict__ gather,
                                const uint32_t* __restrict__ lens, T* __restrict__ out,
                                float* __restrict__ part, int nb, int c, int heads, int kv_heads,
                                int d, float scale) {
  extern __shared__ float smem[];
  const int kh = blockIdx.x, b = blockIdx.y, chunk = blockIdx.z, chunks = gridDim.z;
  const int g = heads / kv_heads, tid = threadIdx.x, nt = blockDim.x;
  const int warps = nt >> 5, warp = tid >> 5, lane = tid & 31;
  const size_t kv_dim = (size_t)kv_heads * d;
  const int p0 = chunk * CHUNK;
  const int n = max(0, min(CHUNK, (int)lens[b] - p0));
  float* sq = smem;                        // g * d: the queries, scaled
  float* sc = sq + g * d;                  // g * CHUNK: scores, then weights
  uint32_t* vr = (uint32_t*)(sc + g * CHUNK);  // CHUNK: V rows
  float* red = (float*)(vr + CHUNK);       // 2 * MAXG * 32: reductions
  float* sacc = red + 2 * MAXG * 32;       // groups * g * d: partial outputs
  for (int i = tid; i < g * d; i += nt)
    sq[i] = to_f(q[(size_t)b * heads * d + (size_t)kh * g * d + i]) * scale;
  for (int i = tid; i < n; i += nt) vr[i] = gather[(size_t)nb * c + (size_t)b * c + p0 + i];
  __syncthreads();
  // Scores: a thread per position, its K row in 16-byte loads.
  for (int i = tid; i < CHUNK; i += nt) {
    float s[MAXG];
#pragma unroll
    for (int h = 0; h < MAXG; h++) s[h] = 0.f;
    if (i < n) {
      const __half* k = pool + (size_t)gather[(size_t)b * c + p0 + i] * kv_dim + (size_t)kh * d;
      if ((d & 7) == 0) {
        // The row in 16-byte loads, all issued before the sums wait on them.
        const uint4* k16 = reinterpret_cast<const uint4*>(k);
#pragma unroll 8
        for (int j = 0; j < d / 8; j++) {
          const uint4 raw = k16[j];
          const __half2* kh2 = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
          for (int e = 0; e < 4; e++) {
            const float2 kf = __half22float2(kh2[e]);
            const int at = 8 * j + 2 * e;
#pragma unroll
            for (int h = 0; h < MAXG; h++)
              if (h < g) s[h] += sq[h * d + at] * kf.x + sq[h * d + at + 1] * kf.y;
          }
        }
      } else {
        for (int j = 0; j < d; j += 2) {
          const float2 kf = __half22float2(*reinterpret_cast<const __half2*>(k + j));
#pragma unroll
          for (int h = 0; h < MAXG; h++)
            if (h < g) s[h] += sq[h * d + j] * kf.x + sq[h * d + j + 1] * kf.y;
        }
      }
    }
#pragma unroll
    for (int h = 0; h < MAXG; h++)
      if (h < g) sc[h * CHUNK + i] = i < n ? s[h] : -INFINITY;
  }
  __syncthreads();
  // Per head: the chunk's max, then weights exp(s - max) and their sum.
  float* rmax = red;
  float* rsum = red + MAXG * 32;
  for (int h = 0; h < g; h++) {
    float m = -INFINITY;
    for (int i = tid; i < CHUNK; i += nt) m = fmaxf(m, sc[h * CHUNK + i]);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    if (lane == 0) rmax[h * 32 + warp] = m;
  }
  __syncthreads();
  if (tid < g) {
    float m = -INFINITY;
    for (int w = 0; w < warps; w++) m = fmaxf(m, rmax[tid * 32 + w]);
    rmax[tid * 32] = m;
  }
  __syncthreads();
  for (int h = 0; h < g; h++) {
    const float m = rmax[h * 32];
    float l = 0.f;
    for (int i = tid; i < CHUNK; i += nt) {
      const float e = i < n ? __expf(sc[h * CHUNK + i] - m) : 0.f;
      sc[h * CHUNK + i] = e;
      l += e;
    }
    l = warp_sum(l);
    if (lane == 0) rsum[h * 32 + warp] = l;
  }
  __syncthreads();
  if (tid < g) {
    float l = 0.f;
    for (int w = 0; w < warps; w++) l += rsum[tid * 32 + w];
    rsum[tid * 32] = l;
  }
  // Weighted sum of V: a thread per pair of dims, `groups` positions at a time.
  const int pairs = d / 2, groups = nt / pairs;
  const int pair = tid % pairs, grp = tid / pairs;
  float acc[MAXG][2];
#pragma unroll
  for (int h = 0; h < MAXG; h++) acc[h][0] = acc[h][1] = 0.f;
  if (grp < groups) {
#pragma unroll 8
    for (int i = grp; i < n; i += groups) {
      const float2 v = __half22float2(
          *reinterpret_cast<const __half2*>(pool + (size_t)vr[i] * kv_dim + (size_t)kh * d + 2 * pair));
#pragma unroll
      for (int h = 0; h < MAXG; h++)
        if (h < g) {
          const float w = sc[h * CHUNK + i];
          acc[h][0] += w * v.x;
          acc[h][1] += w * v.y;
        }
    }
#pragma unroll
    for (int h = 0; h < MAXG; h++)
      if (h < g) {
        sacc[(grp * g + h) * d + 2 * pair] = acc[h][0];
        sacc[(grp * g + h) * d + 2 * pair + 1] = acc[h][1];
      }
  }
  __syncthreads();
  for (int i = tid; i < g * d; i += nt) {
    const int h = i / d, dim = i % d;
    float a = 0.f;
    for (int r = 0; r < groups; r++) a += sacc[(r * g + h) * d + dim];
    const float m = rmax[h * 32], l = rsum[h * 32];
    if (chunks == 1) {
      out[(size_t)b * heads * d + (size_t)(kh * g + h) * d + dim] = from_f<T>(a / l);
    } else {
      float* pp = part + ((((size_t)b * kv_heads + kh) * chunks + chunk) * g + h) * (d + 2);
      if (dim == 0) {
        pp[0] = m;
        pp[1] = l;
      }
      pp[2 + dim] = a;
    }
  }
}

// Merges attention_chunk's partials: block (head, sequence), a thread per dim.
template <typename T>
__device__ void attention_merge(const float* __restrict__ part, T* __restrict__ out, int chunks,
                                int heads, int kv_heads, int d) {
  const int h = blockIdx.x, b = blockIdx.y, g = heads / kv_heads;
  const int kh = h / g, j = h % g;
  for (int dim = threadIdx.x; dim < d; dim += blockDim.x) {
    float mx = -INFINITY;
    for (int k = 0; k < chunks; k++)
      mx = fmaxf(mx, part[((((size_t)b * kv_heads + kh) * chunks + k) * g + j) * (d + 2)]);
    float tot = 0.f, sum = 0.f;
    for (int k = 0; k < chunks; k++) {
      const float* pp = part + ((((size_t)b * kv_heads + kh) * chunks + k) * g + j) * (d + 2);
      if (pp[0] == -INFINITY) continue;  // a chunk past this sequence's context
      const float f = __expf(pp[0] - mx);
      tot += pp[1] * f;
      sum += pp[2 + dim] * f;
    }
    out[(size_t)b * heads * d + (size_t)h * d + dim] = from_f<T>(sum / tot);
  }
}

// gu `(T, 2F)` holds gate then up: out `(T, F)` = silu(gate) * up.
template <typename T>
__device__ void silu_mul(const T* __restrict__ gu, T* __restrict__ out, int rows, int f) {
  const size_t n = (size_t)rows * f;
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (size_t)gridDim.x * blockDim.x) {
    const size_t r = i / f, j = i % f;
    // Rounded through T as candle's two ops would.
    const float g = to_f(gu[r * 2 * f + j]);
    const float sg = to_f(from_f<T>(g / (1.f + __expf(-g))));
    out[i] = from_f<T>(sg * to_f(gu[r * 2 * f + f + j]));
  }
}

// The residual and the next norm: sum = x + y, normed = rms_norm(sum) * w. Block per row; a row
// of up to 8 values a thread is held in registers, its loads all issued at once (one memory
// latency, not one per value), longer rows loop.
constexpr int NORM_PER_THREAD = 8;

template <typename T>
__device__ void add_rms_norm(const T* __restrict__ x, const T* __restrict__ y,
                             const T* __restrict__ w, T* __restrict__ sum, T* __restrict__ normed,
                             int e, float eps) {
  __shared__ float part[32];
  const size_t r = blockIdx.x;
  const int nt = blockDim.x, tid = threadIdx.x;
  const bool held = e <= nt * NORM_PER_THREAD;
  float v[NORM_PER_THREAD];
  float ss = 0.f;
  if (held) {
#pragma unroll
    for (int j = 0; j < NORM_PER_THREAD; j++) {
      const int i = tid + j * nt;
      v[j] = i < e ? to_f(from_f<T>(to_f(x[r * e + i]) + to_f(y[r * e + i]))) : 0.f;
    }
#pragma unroll
    for (int j = 0; j < NORM_PER_THREAD; j++) {
      const int i = tid + j * nt;
      if (i < e) sum[r * e + i] = from_f<T>(v[j]);
      ss += v[j] * v[j];
    }
  } else {
    for (int i = tid; i < e; i += nt) {
      const T s = from_f<T>(to_f(x[r * e + i]) + to_f(y[r * e + i]));
      sum[r * e + i] = s;
      ss += to_f(s) * to_f(s);
    }
  }
  ss = warp_sum(ss);
  if ((tid & 31) == 0) part[tid >> 5] = ss;
  __syncthreads();
  if (tid < 32) {
    float t = tid < (nt >> 5) ? part[tid] : 0.f;
    t = warp_sum(t);
    if (tid == 0) part[0] = t;
  }
  __syncthreads();
  const float inv = rsqrtf(part[0] / e + eps);
  if (held) {
#pragma unroll
    for (int j = 0; j < NORM_PER_THREAD; j++) {
      const int i = tid + j * nt;
      if (i < e) normed[r * e + i] = from_f<T>(v[j] * inv * to_f(w[i]));
    }
  } else {
    for (int i = tid; i < e; i += nt)
      normed[r * e + i] = from_f<T>(to_f(sum[r * e + i]) * inv * to_f(w[i]));
  }
}

#define GEMV(T, S, B)                                                                         \
  extern "C" __global__ void gemv_##S##_##B(const T* x, const T* w, T* y, int n, int k) {     \
    gemv<T, B>(x, w, y, n, k);                                                                \
  }                                                                                           \
  extern "C" __global__ void gemv_glu_##S##_##B(const T* x, const T* w, T* y, int f, int k) { \
    gemv_glu<T, B>(x, w, y, f, k);                                                            \
  }                                                                                           \
  extern "C" __global__ void gemv_qkv_rope_##S##_##B(                                         \
      const T* x, const T* w, const T* cos, const T* sin, T* q_out, __half* pool,             \
      const uint32_t* rows, int k, int heads, int kv_heads, int d, int interleaved) {         \
    gemv_qkv_rope<T, B>(x, w, cos, sin, q_out, pool, rows, k, heads, kv_heads, d,             \
                        interleaved);                                                         \
  }

#define KERNELS(T, S)                                                                          \
  GEMV(T, S, 1)                                                                                \
  GEMV(T, S, 2)                                                                                \
  GEMV(T, S, 3)                                                                                \
  GEMV(T, S, 4)                                                                                \
  GEMV(T, S, 5)                                                                                \
  GEMV(T, S, 6)                                                                                \
  GEMV(T, S, 7)                                                                                \
  GEMV(T, S, 8)                                                                                \
  extern "C" __global__ void rope_write_##S(const T* qkv, const T* cos, const T* sin, T* q_out, \
                                            __half* pool, const uint32_t* rows, int tokens,    \
                                            int heads, int kv_heads, int d, int interleaved) {  \
    rope_write<T>(qkv, cos, sin, q_out, pool, rows, tokens, heads, kv_heads, d, interleaved);  \
  }                                                                                            \
  extern "C" __global__ void attention_chunk_##S(                                             \
      const T* q, const __half* pool, const uint32_t* gather, const uint32_t* lens, T* out,    \
      float* part, int nb, int c, int heads, int kv_heads, int d, float scale) {               \
    attention_chunk<T>(q, pool, gather, lens, out, part, nb, c, heads, kv_heads, d, scale);    \
  }                                                                                            \
  extern "C" __global__ void attention_merge_##S(const float* part, T* out, int chunks,        \
                                                 int heads, int kv_heads, int d) {             \
    attention_merge<T>(part, out, chunks, heads, kv_heads, d);                                 \
  }                                                                                            \
  extern "C" __global__ void silu_mul_##S(const T* gu, T* out, int rows, int f) {              \
    silu_mul<T>(gu, out, rows, f);                                                             \
  }                                                                                            \
  extern "C" __global__ void add_rms_norm_##S(const T* x, const T* y, const T* w, T* sum,      \
                                              T* normed, int e, float eps) {                   \
    add_rms_norm<T>(x, y, w, sum, normed, e, eps);                                             \
  }

KERNELS(__half, f16)
KERNELS(float, f32)
