// AdamW step for bf16 weights with stochastic rounding, CPU: one pass over p, g, m, v.
//
// The same math and the same random bits as triton_kernels/adamw_sr.py (see its header):
//   p <- p (1 - lr wd);  m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2
//   p <- p - step_size * m / (sqrt(v) * inv_bc2_sqrt + eps)
// in fp32, then each bf16 destination is rounded stochastically with 16 bits of
// r = mix32(mix32(i) ^ seed) (p: r, m: r >> 16, v: mix32(r)), i the element index.
// Bytes per element: 14 (bf16 p, g, m, v read; p, m, v written), 20 with fp32 moments.
// Why not PyTorch ops: about 25 elementwise passes with fp32 temporaries; on 2 cores that made
// the optimizer step of SmolLM2-135M cost about 1.5 s. This loop (vectorised: build with
// -fno-math-errno) takes 25 ms there, torch's fused AdamW on the same bf16 tensors 40 ms.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

inline uint32_t mix32(uint32_t x) {  // murmur3's finaliser
  x ^= x >> 16;
  x *= 0x85EBCA6Bu;
  x ^= x >> 13;
  x *= 0xC2B2AE35u;
  return x ^ (x >> 16);
}

inline float from_bf16(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// Adding below the kept 16 bits carries into them with probability = the discarded fraction.
inline uint16_t to_bf16_stochastic(float x, uint32_t r) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return static_cast<uint16_t>((u + (r & 0xFFFFu)) >> 16);
}

inline float load(const uint16_t* p, int64_t i) { return from_bf16(p[i]); }
inline float load(const float* p, int64_t i) { return p[i]; }
inline void store(uint16_t* p, int64_t i, float x, uint32_t r) { p[i] = to_bf16_stochastic(x, r); }
inline void store(float* p, int64_t i, float x, uint32_t) { p[i] = x; }

struct Hyper {
  float beta1, beta2, eps, decay, step_size, inv_bc2_sqrt;
  uint32_t seed;
};

// Elements [begin, end). A plain function (not the parallel_for lambda) so that every pointer
// and scalar is a local the vectoriser can keep in registers.
template <typename S>
void step_range(uint16_t* __restrict p, const uint16_t* __restrict g, S* __restrict m,
                S* __restrict v, int64_t begin, int64_t end, const Hyper h) {
  for (int64_t i = begin; i < end; ++i) {
    const float gi = load(g, i);
    const float mi = h.beta1 * load(m, i) + (1.0f - h.beta1) * gi;
    const float vi = h.beta2 * load(v, i) + (1.0f - h.beta2) * gi * gi;
    const float denom = std::sqrt(vi) * h.inv_bc2_sqrt + h.eps;
    const float pi = load(p, i) * h.decay - h.step_size * mi / denom;
    const uint32_t r = mix32(mix32(static_cast<uint32_t>(i)) ^ h.seed);
    store(p, i, pi, r);
    store(m, i, mi, r >> 16);
    store(v, i, vi, mix32(r));
  }
}

template <typename S>
void step_loop(uint16_t* p, const uint16_t* g, S* m, S* v, int64_t n, const Hyper h) {
  at::parallel_for(0, n, 1 << 14, [=](int64_t begin, int64_t end) {
    step_range(p, g, m, v, begin, end, h);
  });
}

}  // namespace

// In place on contiguous CPU tensors: bf16 param and grad, moments both bf16 or both fp32.
void adamw_sr_step(at::Tensor param, const at::Tensor& grad, at::Tensor exp_avg,
                   at::Tensor exp_avg_sq, double beta1, double beta2, double eps, double decay,
                   double step_size, double inv_bc2_sqrt, int64_t seed) {
  const int64_t n = param.numel();
  for (const at::Tensor& t : {param, grad, exp_avg, exp_avg_sq}) {
    TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.numel() == n,
                "adamw_sr_step: contiguous CPU tensors with the same number of elements");
  }
  TORCH_CHECK(param.scalar_type() == at::kBFloat16 && grad.scalar_type() == at::kBFloat16,
              "adamw_sr_step: param and grad must be bfloat16");
  TORCH_CHECK(exp_avg.scalar_type() == exp_avg_sq.scalar_type() &&
                  (exp_avg.scalar_type() == at::kBFloat16 || exp_avg.scalar_type() == at::kFloat),
              "adamw_sr_step: moments must both be bfloat16 or both float32");
  auto* p = reinterpret_cast<uint16_t*>(param.data_ptr<at::BFloat16>());
  auto* g = reinterpret_cast<const uint16_t*>(grad.data_ptr<at::BFloat16>());
  const Hyper h{static_cast<float>(beta1),     static_cast<float>(beta2),
                static_cast<float>(eps),       static_cast<float>(decay),
                static_cast<float>(step_size), static_cast<float>(inv_bc2_sqrt),
                static_cast<uint32_t>(seed)};
  if (exp_avg.scalar_type() == at::kBFloat16) {
    step_loop(p, g, reinterpret_cast<uint16_t*>(exp_avg.data_ptr<at::BFloat16>()),
              reinterpret_cast<uint16_t*>(exp_avg_sq.data_ptr<at::BFloat16>()), n, h);
  } else {
    step_loop(p, g, exp_avg.data_ptr<float>(), exp_avg_sq.data_ptr<float>(), n, h);
  }
}
