// fastunlearn CUDA row pass for the fused unlearning loss. Pure CUDA (no torch headers), so that
// CI compiles it with nvcc alone; the torch binding is unlearn_loss_cuda.cpp.
//
// One thread block per logit row r of a chunk (z = h W^T computed by cuBLAS, in the inputs'
// dtype T = fp32 / fp16 / bf16; optional bias b and soft-cap c: x = c tanh((z + b) / c)).
//   policy rows (forget / mismatch, r < ref_start):
//       nll_r = lse(x_r) - x_r[y_r]     with x_r[y_r] recomputed in fp32 as <h_r, W_y> (+ b_y)
//       dz_v  = scale_r (softmax(x_r)_v - [v == y_r]) * (1 - tanh^2((z_v + b_v) / c))
//   normal rows (r >= ref_start), reference logits xr in the zr buffer:
//       kl_r  = sum_v q_v (xr_v - x_v) + lse(x_r) - lse(xr_r),   q = softmax(xr_r)
//       dz_v  = scale_r (softmax(x_r)_v - q_v) * (1 - tanh^2((z_v + b_v) / c))
// dz overwrites z in place (dtype T); val[r] gets nll_r or kl_r (fp32).
// softmax(x)_v = exp(x_v - max) / sum (not exp(x_v - lse): lse rounded to fp32 costs precision
// at large logits). -inf logits (a bias masking padded vocabulary entries) give 0 probability
// and add nothing to the cross term; a running max still at -inf is used as 0 (no inf - inf).
// A logit scale is applied by the caller (hidden rows and bias are pre-scaled).
//
// Steps per block: 1. fp32 target logit (nll rows), 2. sweep 1 over the row: online max / sum
// for both models and the cross term sum exp(xr - mr) (xr - x), 16-byte vector loads, fp32 math,
// 3. block reduction, 4. sweep 2: dz written in place, 5. the row value.
// Bytes: per row, T x V read twice for z (and for zr on normal rows) and written once:
// 3 x 2 x V bytes (bf16) for a policy row, 5 x 2 x V for a normal row. FLOPs are negligible next
// to the GEMMs (~20 per element); the pass is bandwidth-bound: at V = 49152, bf16, 8192 rows
// about 2.4 GB, ~0.8 ms at 3 TB/s.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

template <typename T> __device__ __forceinline__ float to_f(T x);
template <> __device__ __forceinline__ float to_f<float>(float x) { return x; }
template <> __device__ __forceinline__ float to_f<__half>(__half x) { return __half2float(x); }
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}

template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Loads VEC consecutive elements (16 bytes when VEC * sizeof(T) == 16) as fp32.
template <typename T, int VEC>
__device__ __forceinline__ void load_vec(const T* p, float (&out)[VEC]) {
  if constexpr (VEC * sizeof(T) == 16) {
    alignas(16) T tmp[VEC];
    *reinterpret_cast<uint4*>(tmp) = *reinterpret_cast<const uint4*>(p);
#pragma unroll
    for (int i = 0; i < VEC; ++i) out[i] = to_f<T>(tmp[i]);
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) out[i] = to_f<T>(p[i]);
  }
}

template <typename T, int VEC>
__device__ __forceinline__ void store_vec(T* p, const float (&in)[VEC]) {
  if constexpr (VEC * sizeof(T) == 16) {
    alignas(16) T tmp[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) tmp[i] = from_f<T>(in[i]);
    *reinterpret_cast<uint4*>(p) = *reinterpret_cast<const uint4*>(tmp);
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) p[i] = from_f<T>(in[i]);
  }
}

// Bias and soft-cap (uniform branches: the flags are the same for the whole grid).
__device__ __forceinline__ float xform(float raw, const float* bias, int64_t v, float cap) {
  float x = bias != nullptr ? raw + bias[v] : raw;
  return cap > 0.f ? cap * tanhf(x / cap) : x;
}

// The running max as an exp() offset: 0 while every value seen is -inf.
__device__ __forceinline__ float finite_or_zero(float m) { return m == -INFINITY ? 0.f : m; }

// (m, s) <- combination of two running (max, sum of exp(x - max)); extra terms scale with s.
__device__ __forceinline__ float merge_scale(float& m, float m2, float& f2) {
  const float mn = fmaxf(m, m2);
  const float f1 = (m == -INFINITY) ? 0.f : __expf(m - mn);
  f2 = (m2 == -INFINITY) ? 0.f : __expf(m2 - mn);
  m = mn;
  return f1;
}

// Loads VEC logits at base, applies bias / soft-cap in place and returns their maximum.
template <typename T, int VEC>
__device__ __forceinline__ float load_xform_max(const T* row, int64_t base, const float* bias,
                                                float cap, float (&x)[VEC]) {
  load_vec<T, VEC>(row + base, x);
  float vmax = -INFINITY;
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    x[i] = xform(x[i], bias, base + i, cap);
    vmax = fmaxf(vmax, x[i]);
  }
  return vmax;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    unlearn_row_pass_kernel(T* __restrict__ z, const T* __restrict__ zr, int64_t ref_start,
                            int64_t V, const int64_t* __restrict__ labels,
                            const float* __restrict__ scale, const T* __restrict__ hc,
                            const T* __restrict__ w, int64_t H, const float* __restrict__ bias,
                            const float* __restrict__ ref_bias, float cap,
                            float* __restrict__ val) {
  __shared__ float sh[5][kWarps];
  __shared__ float result[5];
  const int64_t row = blockIdx.x;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  T* zrow = z + row * V;
  const bool normal = row >= ref_start;
  const T* rrow = normal ? zr + (row - ref_start) * V : nullptr;
  const float sc = scale[row];
  const int64_t y = normal ? -1 : labels[row];

  // 1. target logit in fp32 (avoids the bf16 rounding of the stored logit in the nll)
  float zy = 0.f;
  if (!normal) {
    const T* hr = hc + row * H;
    const T* wy = w + y * H;
    float acc = 0.f;
    for (int64_t j = tid; j < H; j += kThreads) acc += to_f<T>(hr[j]) * to_f<T>(wy[j]);
    acc = warp_sum(acc);
    if (lane == 0) sh[0][warp] = acc;
    __syncthreads();
    if (tid == 0) {
      float t = 0.f;
      for (int i = 0; i < kWarps; ++i) t += sh[0][i];
      result[0] = xform(t, bias, y, cap);
    }
    __syncthreads();
    zy = result[0];
  }

  // 2. sweep 1: running max / sum for the policy (m, s) and the reference (mr, sr, cross)
  float m = -INFINITY, s = 0.f, mr = -INFINITY, sr = 0.f, cross = 0.f;
  for (int64_t base = (int64_t)tid * VEC; base < V; base += (int64_t)kThreads * VEC) {
    float x[VEC];
    const float vmax = load_xform_max<T, VEC>(zrow, base, bias, cap, x);
    if (vmax > m) {
      s *= __expf(m - vmax);
      m = vmax;
    }
    const float m0 = finite_or_zero(m);
#pragma unroll
    for (int i = 0; i < VEC; ++i) s += __expf(x[i] - m0);
    if (normal) {
      float xr[VEC];
      const float rmax = load_xform_max<T, VEC>(rrow, base, ref_bias, cap, xr);
      if (rmax > mr) {
        const float f = __expf(mr - rmax);
        sr *= f;
        cross *= f;
        mr = rmax;
      }
      const float mr0 = finite_or_zero(mr);
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const float e = __expf(xr[i] - mr0);
        sr += e;
        if (e > 0.f) cross += e * (xr[i] - x[i]);  // q_v = 0: no 0 * inf
      }
    }
  }

  // 3. block reduction of (m, s) and (mr, sr, cross)
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
    float f2, f1 = merge_scale(m, m2, f2);
    s = s * f1 + s2 * f2;
    float mr2 = __shfl_xor_sync(0xffffffffu, mr, o), sr2 = __shfl_xor_sync(0xffffffffu, sr, o);
    float c2 = __shfl_xor_sync(0xffffffffu, cross, o);
    float g2, g1 = merge_scale(mr, mr2, g2);
    sr = sr * g1 + sr2 * g2;
    cross = cross * g1 + c2 * g2;
  }
  __syncthreads();  // sh[0] may still be read by thread 0 of step 1
  if (lane == 0) {
    sh[0][warp] = m; sh[1][warp] = s; sh[2][warp] = mr; sh[3][warp] = sr; sh[4][warp] = cross;
  }
  __syncthreads();
  if (tid == 0) {
    float M = sh[0][0], S = sh[1][0], MR = sh[2][0], SR = sh[3][0], C = sh[4][0];
    for (int i = 1; i < kWarps; ++i) {
      float f2, f1 = merge_scale(M, sh[0][i], f2);
      S = S * f1 + sh[1][i] * f2;
      float g2, g1 = merge_scale(MR, sh[2][i], g2);
      SR = SR * g1 + sh[3][i] * g2;
      C = C * g1 + sh[4][i] * g2;
    }
    M = finite_or_zero(M);
    MR = finite_or_zero(MR);
    const float lse = M + logf(S);
    result[0] = M;
    result[1] = 1.f / S;
    if (normal) {
      const float lse_r = MR + logf(SR);
      result[2] = MR;
      result[3] = 1.f / SR;
      val[row] = C / SR + (lse - lse_r);  // 5. the row value
    } else {
      result[2] = 0.f;
      result[3] = 0.f;
      val[row] = lse - zy;
    }
  }
  __syncthreads();
  const float row_max = result[0], inv_s = result[1], ref_max = result[2], inv_sr = result[3];

  // 4. sweep 2: dz in place
  for (int64_t base = (int64_t)tid * VEC; base < V; base += (int64_t)kThreads * VEC) {
    float x[VEC], d[VEC];
    load_vec<T, VEC>(zrow + base, x);
    float xr[VEC];
    if (normal) load_vec<T, VEC>(rrow + base, xr);
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const float xb = bias != nullptr ? x[i] + bias[base + i] : x[i];
      const float t = cap > 0.f ? tanhf(xb / cap) : 0.f;
      const float xv = cap > 0.f ? cap * t : xb;
      float g = __expf(xv - row_max) * inv_s;
      if (normal) {
        g -= __expf(xform(xr[i], ref_bias, base + i, cap) - ref_max) * inv_sr;
      } else if (base + i == y) {
        g -= 1.f;
      }
      g *= sc;
      if (cap > 0.f) g *= 1.f - t * t;  // exactly 0 where tanh saturates
      d[i] = g;
    }
    store_vec<T, VEC>(zrow + base, d);
  }
}

template <typename T, int VEC>
cudaError_t launch(void* z, const void* zr, int64_t rows, int64_t ref_start, int64_t V,
                   const int64_t* labels, const float* scale, const void* hc, const void* w,
                   int64_t H, const float* bias, const float* ref_bias, float cap, float* val,
                   cudaStream_t stream) {
  unlearn_row_pass_kernel<T, VEC><<<(unsigned)rows, kThreads, 0, stream>>>(
      static_cast<T*>(z), static_cast<const T*>(zr), ref_start, V, labels, scale,
      static_cast<const T*>(hc), static_cast<const T*>(w), H, bias, ref_bias, cap, val);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_any(void* z, const void* zr, int64_t rows, int64_t ref_start, int64_t V,
                       const int64_t* labels, const float* scale, const void* hc, const void* w,
                       int64_t H, const float* bias, const float* ref_bias, float cap, float* val,
                       cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  // 16-byte loads need V % kVec == 0 and 16-byte aligned row starts in both buffers
  const bool aligned = (V % kVec == 0) && (reinterpret_cast<uintptr_t>(z) % 16 == 0) &&
                       (zr == nullptr || reinterpret_cast<uintptr_t>(zr) % 16 == 0);
  if (aligned)
    return launch<T, kVec>(z, zr, rows, ref_start, V, labels, scale, hc, w, H, bias, ref_bias,
                           cap, val, stream);
  return launch<T, 1>(z, zr, rows, ref_start, V, labels, scale, hc, w, H, bias, ref_bias, cap,
                      val, stream);
}

}  // namespace

// dtype: 0 fp32, 1 fp16, 2 bf16. Returns a cudaError_t code (0 = success).
extern "C" int fastunlearn_row_pass(int dtype, void* z, const void* zr, int64_t rows,
                                    int64_t ref_start, int64_t V, const int64_t* labels,
                                    const float* scale, const void* hc, const void* w, int64_t H,
                                    const float* bias, const float* ref_bias, float cap,
                                    float* val, void* stream) {
  if (rows <= 0) return 0;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case 0:
      return launch_any<float>(z, zr, rows, ref_start, V, labels, scale, hc, w, H, bias,
                               ref_bias, cap, val, st);
    case 1:
      return launch_any<__half>(z, zr, rows, ref_start, V, labels, scale, hc, w, H, bias,
                                ref_bias, cap, val, st);
    case 2:
      return launch_any<__nv_bfloat16>(z, zr, rows, ref_start, V, labels, scale, hc, w, H, bias,
                                       ref_bias, cap, val, st);
    default:
      return static_cast<int>(cudaErrorInvalidValue);
  }
}

extern "C" const char* fastunlearn_cuda_error_string(int code) {
  return cudaGetErrorString(static_cast<cudaError_t>(code));
}
