// fastunlearn C++ CPU backend: the fused unlearning loss (gradient ascent, mismatch NLL, KL to a
// reference) with gradients computed in the forward, without a (BT, V) logits buffer.
//
// Math, per valid row r of kind k (z = s (h W^T + b) with the logit scale s, optionally
// soft-capped z <- c tanh(z / c); the scale is applied to the gathered hidden rows and the bias):
//   nll_r = lse(z_r) - z_r[y_r]                           d nll / dz = softmax(z_r) - onehot(y_r)
//   kl_r  = sum_v q_v (zr_v - z_v) + lse(z_r) - lse(zr_r)  d kl / dz  = softmax(z_r) - q
//           with q = softmax(zr_r), zr = h_ref W_ref^T + b_ref (no gradient)
//   loss  = sum_r scale_r * val_r,  scale = (-eps_forget | eps_mismatch | eps_normal) / count_k
//           ("mean") or the bare coefficient ("sum").
//
// Structure: valid rows are gathered in kind order (forget, mismatch, normal) so that each chunk
// of R rows has its normal rows as a suffix of Rn rows. Per chunk:
//   1. Z  = H_c W^T          (R, V) fp32 GEMM (oneDNN from libtorch when available, else at::mm)
//   2. ZR = HR_c W_ref^T     (Rn, V) fp32 GEMM, normal rows only
//   3. row pass, at::parallel_for over rows: max, exp-sum (exp stored in place), dZ in place.
//      One row of Z and ZR (2 x 4V bytes, 384 KiB at V = 49152) stays in L2 for the three sweeps.
//   4. dX_c = dZ W (R, H);  dW += dZ^T H_c (fp32);  db += colsum(dZ)
// FLOPs: 2NHV (Z) + 2 Nn HV (ZR) + 2NHV (dX) + 2NHV (dW): the GEMM floor.
// Bytes beyond the GEMMs: Z / ZR are read once from DRAM by the row pass and written once as dZ
// (about 3 x 4 x R x V per chunk). Workspace: 2 x R x V fp32 plus dW (V, H) fp32.
// This loop is for fp32 heads. A bf16 head goes through the Python chunk driver with bf16 GEMMs
// (about twice the fp32 rate on CPUs with AVX-512 bf16) and this file's row pass (row_pass_py),
// which widens each bf16 row to fp32 in a per-thread buffer: no fp32 copy of the head.
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/record_function.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

// oneDNN matmul as bundled in libtorch_cpu (ATen/native/mkldnn/Matmul.h, not shipped as a
// header): result = beta * result + alpha * mat1 @ mat2 on strided fp32 tensors. Declared weak so
// that a torch built without oneDNN still loads this extension; then (or if it throws, or if the
// Python side's self-check disagrees with at::mm) the GEMMs go through at::mm (MKL / OpenBLAS).
// Why: on the AMD EPYC CI machines oneDNN's fp32 GEMM runs about 2x faster than MKL's.
namespace at {
namespace native {
TORCH_API void mkldnn_matmul(const Tensor& mat1, const Tensor& mat2, const Tensor& result,
                             float beta, float alpha) __attribute__((weak));
}  // namespace native
}  // namespace at

namespace {

bool g_use_onednn = false;  // set from Python (set_gemm) after its self-check

// c = beta * c + a @ b (fp32, c contiguous)
void gemm(const at::Tensor& a, const at::Tensor& b, at::Tensor& c, float beta) {
  if (g_use_onednn && &at::native::mkldnn_matmul != nullptr) {
    try {
      at::native::mkldnn_matmul(a, b, c, beta, 1.0f);
      return;
    } catch (const c10::Error&) {
      g_use_onednn = false;  // unsupported here: fall back for good
    }
  }
  if (beta == 0.0f) {
    at::mm_out(c, a, b);
  } else {
    c.addmm_(a, b, beta, 1.0f);
  }
}

// exp(x) for x <= ~88 written so that GCC vectorises it inside `omp simd` loops (no libm call):
// range reduction
// x = n ln2 + r (|r| <= ln2 / 2, ln2 split in hi / lo parts), degree-7 Taylor for exp(r)
// (relative error ~1e-9 before rounding, i.e. within an ulp or two of expf), scale by 2^n built
// in the exponent bits. Inputs below -87 are clamped (result ~1e-38 instead of 0: harmless in
// sums over the vocabulary).
static inline float fast_exp(float x) {
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  // round to nearest with the 1.5 * 2^23 trick (std::floor is not inlined without -ffast-math)
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = (x - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
  float p = 1.9841270e-4f;  // 1/7!
  p = p * r + 1.3888889e-3f;
  p = p * r + 8.3333333e-3f;
  p = p * r + 4.1666667e-2f;
  p = p * r + 1.6666667e-1f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

static inline float row_max(const float* x, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < n; ++i) m = std::max(m, x[i]);
  return m;
}

// Bias and soft-cap on one row, in place (rare paths: plain loops). With a cap the row holds
// t = tanh(z / c) afterwards (the logit is c t): the cap's derivative is then 1 - t^2, exactly 0
// where tanh saturates (1 - (c t)^2 / c^2 is not).
static void prepare_row(float* z, const float* bias, float cap, int64_t n) {
  if (bias != nullptr) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) z[i] += bias[i];
  }
  if (cap > 0.0f) {
    const float inv = 1.0f / cap;
    for (int64_t i = 0; i < n; ++i) z[i] = std::tanh(z[i] * inv);
  }
}

// Low-precision logits (bf16) are widened into an fp32 row buffer, run through the same pass and
// rounded back: the pass always computes in fp32.
static inline void load_row(float* dst, const at::BFloat16* src, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

static inline void store_row(at::BFloat16* dst, const float* src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = at::BFloat16(src[i]);  // round to nearest even
}

struct RowPass {
  void* z;               // (R, V) policy logits (fp32 or bf16); overwritten with dZ
  void* zr;              // (Rn, V) reference logits of the normal suffix (scratch), z's dtype
  bool low_precision;    // z / zr hold bf16
  const float* target;   // (R - Rn) fp32 target logits of the NLL rows (before bias), or null
  const float* bias;     // (V) or null
  const float* ref_bias; // (V) or null
  const int64_t* label;  // (R)
  const float* scale;    // (R) d loss / d val_r
  float* val;            // (R) out: nll or kl per row
  float cap;             // soft-cap, <= 0 for none
  int64_t R, Rn, V;

  // Steps 3a-3c for row i held in fp32 at zi (and its reference row at ri for a normal row).
  // kCap: the row holds t = tanh(z / c) and the logit is c t; the dz pass needs t for the cap's
  // derivative, so the exponentials are recomputed instead of stored. Softmax as
  // exp(z - max) / sum.
  template <bool kCap>
  void row(int64_t i, float* zi, float* ri) const {
    const int64_t V_ = V;
    const float c = kCap ? cap : 1.0f;
    const bool normal = i >= R - Rn;
    // a low-precision logit would carry its rounding (2^-9 relative in bf16) into the NLL
    if (!normal && target != nullptr) zi[label[i]] = target[i];
    prepare_row(zi, bias, cap, V_);
    const float sc = scale[i];
    if (!normal) {
      const int64_t y = label[i];
      const float ty = zi[y];
      const float zy = c * ty;
      const float m = c * row_max(zi, V_);
      float s = 0.0f;
#pragma omp simd reduction(+ : s)
      for (int64_t v = 0; v < V_; ++v) {
        const float e = fast_exp(c * zi[v] - m);
        s += e;
        if (!kCap) zi[v] = e;
      }
      const float lse = m + std::log(s);
      val[i] = lse - zy;
      const float k = sc / s;
      if (kCap) {
#pragma omp simd
        for (int64_t v = 0; v < V_; ++v) {
          const float t = zi[v];
          zi[v] = k * fast_exp(c * t - m) * (1.0f - t * t);
        }
        zi[y] -= sc * (1.0f - ty * ty);
      } else {
#pragma omp simd
        for (int64_t v = 0; v < V_; ++v) zi[v] *= k;
        zi[y] -= sc;
      }
      return;
    }
    prepare_row(ri, ref_bias, cap, V_);
    const float m = c * row_max(zi, V_);
    const float mr = c * row_max(ri, V_);
    float s = 0.0f, sr = 0.0f, cross = 0.0f;  // cross = sum_v exp(zr - mr) (zr - z)
    constexpr float kNegInf = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(+ : s, sr, cross)
    for (int64_t v = 0; v < V_; ++v) {
      const float a = c * zi[v], b = c * ri[v];
      const float e = fast_exp(a - m), er = fast_exp(b - mr);
      s += e;
      sr += er;
      // q_v = 0 where zr = -inf (a masked entry): no term, even where z = -inf too
      cross += b > kNegInf ? er * (b - a) : 0.0f;
      if (!kCap) {
        zi[v] = e;
        ri[v] = er;
      }
    }
    const float lse = m + std::log(s), lse_r = mr + std::log(sr);
    val[i] = cross / sr + (lse - lse_r);
    const float k = sc / s, kr = sc / sr;
    if (kCap) {
#pragma omp simd
      for (int64_t v = 0; v < V_; ++v) {
        const float t = zi[v];
        zi[v] = (k * fast_exp(c * t - m) - kr * fast_exp(c * ri[v] - mr)) * (1.0f - t * t);
      }
    } else {
#pragma omp simd
      for (int64_t v = 0; v < V_; ++v) zi[v] = k * zi[v] - kr * ri[v];
    }
  }

  void row(int64_t i, float* zi, float* ri) const {
    if (cap > 0.0f) row<true>(i, zi, ri); else row<false>(i, zi, ri);
  }

  void run() const {
    RECORD_FUNCTION("fastunlearn::cpp_row_pass", std::vector<c10::IValue>());
    const int64_t first_normal = R - Rn;
    at::parallel_for(0, R, 1, [&](int64_t lo, int64_t hi) {
      if (!low_precision) {
        float* zf = static_cast<float*>(z);
        float* rf = static_cast<float*>(zr);
        for (int64_t i = lo; i < hi; ++i)
          row(i, zf + i * V, i >= first_normal ? rf + (i - first_normal) * V : nullptr);
        return;
      }
      // one fp32 copy of the row (and of its reference row) per thread, reused: L2-sized
      std::vector<float> zi(V), ri(Rn > 0 ? V : 0);
      auto* zb = static_cast<at::BFloat16*>(z);
      auto* rb = static_cast<at::BFloat16*>(zr);
      for (int64_t i = lo; i < hi; ++i) {
        const bool normal = i >= first_normal;
        load_row(zi.data(), zb + i * V, V);
        if (normal) load_row(ri.data(), rb + (i - first_normal) * V, V);
        row(i, zi.data(), normal ? ri.data() : nullptr);
        store_row(zb + i * V, zi.data(), V);
      }
    });
  }
};

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "fastunlearn cpp backend: ", name,
              " must be a CPU tensor, got ", t.device());
}

}  // namespace

// Returns {loss (), terms (3) fp32, counts (3) int64, dX (BT, H) in hidden's dtype,
//          dW (V, H) fp32, db (V) fp32 or empty} for grad_output = 1. need_dx / need_dw = false
// (frozen hidden states / frozen head, e.g. LoRA) skip that GEMM and return an empty (0,) tensor.
std::vector<at::Tensor> forward_backward(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels,
    const at::Tensor& kind, const c10::optional<at::Tensor>& ref_hidden_opt,
    const c10::optional<at::Tensor>& ref_weight_opt, const c10::optional<at::Tensor>& bias_opt,
    const c10::optional<at::Tensor>& ref_bias_opt, double eps_forget, double eps_mismatch,
    double eps_normal, double softcap, double logit_scale, bool reduction_sum,
    int64_t ignore_index, int64_t chunk_rows, bool need_dx, bool need_dw) {
  // ---- input checks: one clear line each ----
  check_cpu(hidden, "hidden");
  check_cpu(weight, "weight");
  check_cpu(labels, "labels");
  check_cpu(kind, "kind");
  TORCH_CHECK(hidden.dim() == 2, "hidden must be (BT, H), got ", hidden.sizes());
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == hidden.size(1),
              "weight must be (V, H) with H=", hidden.size(1), ", got ", weight.sizes());
  // other heads take the chunk driver with their own GEMM dtype (no fp32 copy of a bf16 head)
  TORCH_CHECK(at::isFloatingType(hidden.scalar_type()) && weight.scalar_type() == at::kFloat,
              "the fused loop takes a floating-point hidden and an fp32 weight, got ",
              hidden.scalar_type(), " and ", weight.scalar_type());
  const int64_t BT = hidden.size(0), H = hidden.size(1), V = weight.size(0);
  TORCH_CHECK(V > 0, "weight must have at least one vocabulary row");
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == BT, "labels must be (", BT, ",), got ",
              labels.sizes());
  TORCH_CHECK(kind.dim() == 1 && kind.size(0) == BT, "kind must be (", BT, ",), got ",
              kind.sizes());
  TORCH_CHECK(!at::isFloatingType(labels.scalar_type()) && !at::isFloatingType(kind.scalar_type()),
              "labels and kind must be integer tensors");
  TORCH_CHECK(chunk_rows > 0, "chunk_rows must be positive, got ", chunk_rows);
  const bool has_ref = ref_hidden_opt.has_value() && ref_hidden_opt->defined();
  if (has_ref) {
    check_cpu(*ref_hidden_opt, "ref_hidden");
    TORCH_CHECK(ref_hidden_opt->sizes() == hidden.sizes(), "ref_hidden must be aligned with hidden ",
                hidden.sizes(), ", got ", ref_hidden_opt->sizes());
  }
  const bool has_rw = ref_weight_opt.has_value() && ref_weight_opt->defined();
  if (has_rw) {
    check_cpu(*ref_weight_opt, "ref_weight");
    TORCH_CHECK(ref_weight_opt->sizes() == weight.sizes(), "ref_weight ", ref_weight_opt->sizes(),
                " differs from the policy head ", weight.sizes());
  }
  const bool has_bias = bias_opt.has_value() && bias_opt->defined();
  const bool has_rbias = ref_bias_opt.has_value() && ref_bias_opt->defined();
  if (has_bias) {
    check_cpu(*bias_opt, "bias");
    TORCH_CHECK(bias_opt->dim() == 1 && bias_opt->size(0) == V, "bias must be (", V, ",), got ",
                bias_opt->sizes());
  }
  if (has_rbias) {
    check_cpu(*ref_bias_opt, "ref_bias");
    TORCH_CHECK(ref_bias_opt->dim() == 1 && ref_bias_opt->size(0) == V, "ref_bias must be (", V,
                ",), got ", ref_bias_opt->sizes());
  }

  // ---- valid rows in kind order (host loop: CPU tensors, no device sync involved) ----
  const at::Tensor lab = labels.to(at::kLong).contiguous();
  const at::Tensor knd = kind.to(at::kLong).contiguous();
  const int64_t* lp = lab.data_ptr<int64_t>();
  const int64_t* kp = knd.data_ptr<int64_t>();
  std::vector<int64_t> by_kind[3];
  for (int64_t r = 0; r < BT; ++r) {
    if (lp[r] == ignore_index) continue;
    const int64_t k = kp[r];
    TORCH_CHECK(k >= 0 && k <= 2, "kind must be 0 (forget), 1 (mismatch) or 2 (normal), got ", k,
                " at row ", r);
    TORCH_CHECK(lp[r] >= 0 && lp[r] < V, "label ", lp[r], " at row ", r,
                " is outside the vocabulary [0, ", V, ")");
    if (k == 2 && !has_ref) continue;  // no reference: the KL term is absent
    by_kind[k].push_back(r);
  }
  const int64_t counts[3] = {(int64_t)by_kind[0].size(), (int64_t)by_kind[1].size(),
                             (int64_t)by_kind[2].size()};
  const int64_t N = counts[0] + counts[1] + counts[2];
  const double sign[3] = {-eps_forget, eps_mismatch, eps_normal};
  float kscale[3];
  for (int k = 0; k < 3; ++k)
    kscale[k] = (float)(reduction_sum ? sign[k] : sign[k] / (double)std::max<int64_t>(counts[k], 1));

  std::vector<int64_t> rows;
  std::vector<int64_t> row_label;
  std::vector<float> row_scale;
  rows.reserve(N);
  row_label.reserve(N);
  row_scale.reserve(N);
  for (int k = 0; k < 3; ++k)
    for (int64_t r : by_kind[k]) {
      rows.push_back(r);
      row_label.push_back(lp[r]);
      row_scale.push_back(kscale[k]);
    }

  const auto f32 = hidden.options().dtype(at::kFloat);
  at::Tensor dX = need_dx ? at::zeros({BT, H}, hidden.options()) : at::empty({0}, hidden.options());
  // dW is written (beta = 0) by the first chunk: no separate zero-fill pass over (V, H)
  at::Tensor dW = !need_dw ? at::empty({0}, f32)
                           : (N > 0 ? at::empty({V, H}, f32) : at::zeros({V, H}, f32));
  at::Tensor db = has_bias ? at::zeros({V}, f32) : at::empty({0}, f32);
  std::vector<float> val(N, 0.0f);

  if (N > 0) {
    const at::Tensor W = weight.contiguous();
    const at::Tensor WR = has_rw ? ref_weight_opt->to(at::kFloat).contiguous() : W;
    // the logit scale goes on the (V) biases and the gathered hidden rows, never on a head
    const float ls = static_cast<float>(logit_scale);
    const at::Tensor b = has_bias ? (bias_opt->to(at::kFloat) * ls).contiguous() : at::Tensor();
    const at::Tensor rb =
        has_rbias ? (ref_bias_opt->to(at::kFloat) * ls).contiguous() : at::Tensor();
    const at::Tensor rows_t = at::from_blob(rows.data(), {N}, at::kLong);
    const int64_t R_max = std::min<int64_t>(chunk_rows, N);
    const int64_t first_normal = counts[0] + counts[1];
    at::Tensor zbuf = at::empty({R_max, V}, f32);
    at::Tensor zrbuf = counts[2] > 0 ? at::empty({std::min(R_max, counts[2]), V}, f32) : at::Tensor();

    for (int64_t s = 0; s < N; s += R_max) {
      const int64_t R = std::min(R_max, N - s);
      const int64_t Rn = std::max<int64_t>(0, s + R - std::max(s, first_normal));
      const at::Tensor idx = rows_t.narrow(0, s, R);
      // 1. policy logits of the chunk
      at::Tensor hc = hidden.index_select(0, idx).to(at::kFloat).contiguous();
      if (ls != 1.0f) hc.mul_(ls);
      at::Tensor z = zbuf.narrow(0, 0, R);
      gemm(hc, W.t(), z, 0.0f);
      // 2. reference logits of the normal suffix
      at::Tensor zr;
      if (Rn > 0) {
        at::Tensor hr =
            ref_hidden_opt->index_select(0, idx.narrow(0, R - Rn, Rn)).to(at::kFloat).contiguous();
        if (ls != 1.0f) hr.mul_(ls);
        zr = zrbuf.narrow(0, 0, Rn);
        gemm(hr, WR.t(), zr, 0.0f);
      }
      // 3. fused row pass: values and dZ in place
      RowPass pass{z.data_ptr<float>(), Rn > 0 ? zr.data_ptr<float>() : nullptr, false, nullptr,
                   has_bias ? b.data_ptr<float>() : nullptr,
                   has_rbias ? rb.data_ptr<float>() : nullptr, row_label.data() + s,
                   row_scale.data() + s, val.data() + s, softcap > 0 ? (float)softcap : 0.0f,
                   R, Rn, V};
      pass.run();
      // 4. fold dZ into dX, dW (fp32), db
      if (need_dx) {
        at::Tensor dxc = at::empty({R, H}, f32);
        gemm(z, W, dxc, 0.0f);
        if (ls != 1.0f) dxc.mul_(ls);
        dX.index_copy_(0, idx, dxc.to(hidden.scalar_type()));
      }
      if (need_dw) gemm(z.t(), hc, dW, s == 0 ? 0.0f : 1.0f);
      if (has_bias) db.add_(z.sum(0));
    }
    if (has_bias && ls != 1.0f) db.mul_(ls);
  }

  // ---- terms, in double, in a fixed order (deterministic) ----
  double sums[3] = {0.0, 0.0, 0.0};
  for (int64_t i = 0, k = 0; k < 3; ++k)
    for (int64_t j = 0; j < counts[k]; ++j, ++i) sums[k] += (double)val[i];
  at::Tensor terms = at::empty({3}, f32);
  double loss = 0.0;
  for (int k = 0; k < 3; ++k) {
    const double t = reduction_sum ? sums[k] : sums[k] / (double)std::max<int64_t>(counts[k], 1);
    terms[k] = t;
    loss += sign[k] * t;
  }
  at::Tensor cnt = at::tensor({counts[0], counts[1], counts[2]}, at::kLong);
  return {at::scalar_tensor(loss, f32), terms, cnt, dX, dW, db};
}

// GEMM engine switch: "onednn" (if linked in) or "aten". Returns the engine in use.
std::string set_gemm(const std::string& name) {
  TORCH_CHECK(name == "onednn" || name == "aten", "gemm must be 'onednn' or 'aten', got ", name);
  g_use_onednn = name == "onednn" && &at::native::mkldnn_matmul != nullptr;
  return g_use_onednn ? "onednn" : "aten";
}

std::string gemm_engine() { return g_use_onednn ? "onednn" : "aten"; }

// c = beta * c + a @ b through the selected engine (exposed for the self-check and tests)
at::Tensor gemm_py(const at::Tensor& a, const at::Tensor& b, at::Tensor c, double beta) {
  TORCH_CHECK(a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat &&
              c.scalar_type() == at::kFloat && c.is_contiguous(), "gemm: fp32, contiguous c");
  gemm(a, b, c, (float)beta);
  return c;
}

// The fused row pass alone, for the chunk driver: z (R, V) fp32 or bf16 logits of the chunk,
// contiguous, overwritten with dZ in their dtype; zr (R - ref_start, V) reference logits of its
// normal suffix in z's dtype (scratch) or none; labels (R) int64 and scale (R) fp32; target
// (ref_start) fp32 target logits of the NLL rows before the bias, or none (then read from z);
// biases (V) fp32, already multiplied by the logit scale. Returns each row's value (NLL, or KL on
// the suffix).
at::Tensor row_pass_py(at::Tensor z, const c10::optional<at::Tensor>& zr_opt,
                       const at::Tensor& labels, const at::Tensor& scale, int64_t ref_start,
                       const c10::optional<at::Tensor>& target_opt,
                       const c10::optional<at::Tensor>& bias_opt,
                       const c10::optional<at::Tensor>& ref_bias_opt, double softcap) {
  const auto dt = z.scalar_type();
  TORCH_CHECK(z.dim() == 2 && (dt == at::kFloat || dt == at::kBFloat16) && z.is_contiguous() &&
                  z.device().is_cpu(),
              "row_pass: z must be a contiguous (R, V) fp32 or bf16 CPU tensor");
  const int64_t R = z.size(0), V = z.size(1), Rn = R - ref_start;
  TORCH_CHECK(ref_start >= 0 && Rn >= 0, "row_pass: ref_start must be in [0, R], got ", ref_start);
  const bool has_zr = zr_opt.has_value() && zr_opt->defined();
  TORCH_CHECK(has_zr == (Rn > 0), "row_pass: reference logits are given exactly for normal rows");
  if (has_zr)
    TORCH_CHECK(zr_opt->scalar_type() == dt && zr_opt->is_contiguous() &&
                    zr_opt->size(0) == Rn && zr_opt->size(1) == V,
                "row_pass: zr must be a contiguous (", Rn, ", ", V, ") tensor of z's dtype");
  TORCH_CHECK(labels.scalar_type() == at::kLong && labels.is_contiguous() &&
                  labels.numel() == R, "row_pass: labels must be (", R, ",) contiguous int64");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.numel() == R,
              "row_pass: scale must be (", R, ",) contiguous fp32");
  const int64_t* lp = labels.data_ptr<int64_t>();
  for (int64_t r = 0; r < ref_start; ++r)
    TORCH_CHECK(lp[r] >= 0 && lp[r] < V, "row_pass: label ", lp[r], " outside [0, ", V, ")");
  auto vec = [](const c10::optional<at::Tensor>& t, int64_t n, const char* name) -> const float* {
    if (!t.has_value() || !t->defined()) return nullptr;
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == n,
                "row_pass: ", name, " must be (", n, ",) contiguous fp32");
    return t->data_ptr<float>();
  };
  at::Tensor val = at::empty({R}, z.options().dtype(at::kFloat));
  RowPass pass{z.data_ptr(), has_zr ? zr_opt->data_ptr() : nullptr, dt == at::kBFloat16,
               vec(target_opt, ref_start, "target"), vec(bias_opt, V, "bias"),
               vec(ref_bias_opt, V, "ref_bias"), lp, scale.data_ptr<float>(),
               val.data_ptr<float>(), softcap > 0 ? (float)softcap : 0.0f, R, Rn, V};
  pass.run();
  return val;
}

// csrc/adamw_sr_cpu.cpp (the optimizer step shares this extension: one build, one load)
void adamw_sr_step(at::Tensor param, const at::Tensor& grad, at::Tensor exp_avg,
                   at::Tensor exp_avg_sq, double beta1, double beta2, double eps, double decay,
                   double step_size, double inv_bc2_sqrt, int64_t seed);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastunlearn fused unlearning loss, C++ CPU backend";
  m.def("set_gemm", &set_gemm, "select the GEMM engine: 'onednn' or 'aten'");
  m.def("gemm_engine", &gemm_engine, "the GEMM engine in use");
  m.def("gemm", &gemm_py, "c = beta * c + a @ b with the selected engine");
  m.def("row_pass", &row_pass_py,
        "the fused row pass on one chunk of fp32 or bf16 logits (in place)", py::arg("z"),
        py::arg("zr"), py::arg("labels"), py::arg("scale"), py::arg("ref_start"),
        py::arg("target"), py::arg("bias"), py::arg("ref_bias"), py::arg("softcap"));
  m.def("forward_backward", &forward_backward,
        "Fused unlearning loss: returns (loss, terms, counts, dX, dW, db) for grad_output = 1",
        py::arg("hidden"), py::arg("weight"), py::arg("labels"), py::arg("kind"),
        py::arg("ref_hidden"), py::arg("ref_weight"), py::arg("bias"), py::arg("ref_bias"),
        py::arg("eps_forget"), py::arg("eps_mismatch"), py::arg("eps_normal"),
        py::arg("softcap"), py::arg("logit_scale"), py::arg("reduction_sum"),
        py::arg("ignore_index"),
        py::arg("chunk_rows"), py::arg("need_dx") = true, py::arg("need_dw") = true);
  m.def("adamw_sr_step", &adamw_sr_step,
        "In-place AdamW step on bf16 param / grad with stochastically rounded stores",
        py::arg("param"), py::arg("grad"), py::arg("exp_avg"), py::arg("exp_avg_sq"),
        py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("decay"),
        py::arg("step_size"), py::arg("inv_bc2_sqrt"), py::arg("seed"));
}
