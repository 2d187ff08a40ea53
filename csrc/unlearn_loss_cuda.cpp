// Torch binding of the CUDA row pass (unlearn_loss_kernels.cu). Plain C++ with torch headers and
// no CUDA headers: the stream comes from Python as an integer handle, the device is set by the
// caller (torch.cuda.device), so this file compiles against a CPU-only torch as well (CI).
// The GEMMs (logits, dX, dW) run in fastunlearn/losses/cuda_backend.py through ATen / cuBLAS.
#include <torch/extension.h>

#include <cstdint>

extern "C" int fastunlearn_row_pass(int dtype, void* z, const void* zr, int64_t rows,
                                    int64_t ref_start, int64_t V, const int64_t* labels,
                                    const float* scale, const void* hc, const void* w, int64_t H,
                                    const float* bias, const float* ref_bias, float cap,
                                    float* val, void* stream);
extern "C" const char* fastunlearn_cuda_error_string(int code);

namespace {

int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return 0;
    case at::kHalf: return 1;
    case at::kBFloat16: return 2;
    default:
      TORCH_CHECK(false, "fastunlearn cuda backend: logits must be float32, float16 or bfloat16, "
                  "got ", t);
  }
  return -1;
}

void check_cuda(const at::Tensor& t, const at::Tensor& like, const char* name) {
  TORCH_CHECK(t.is_cuda(), "fastunlearn cuda backend: ", name, " must be a CUDA tensor, got ",
              t.device());
  TORCH_CHECK(t.device() == like.device(), "fastunlearn cuda backend: ", name, " is on ",
              t.device(), " but the logits are on ", like.device());
  TORCH_CHECK(t.is_contiguous(), "fastunlearn cuda backend: ", name, " must be contiguous");
}

}  // namespace

// z: (R, V) policy logits, overwritten with dz. zr: (R - ref_start, V) reference logits of the
// normal rows (the chunk's suffix) or None. labels (R) int64, scale (R) fp32, hc (R, H) hidden
// rows of the chunk and w (V, H) head, both in z's dtype (for the fp32 target logit).
// bias / ref_bias: (V) fp32 or None. Returns val (R) fp32: nll or kl per row.
at::Tensor row_pass(at::Tensor z, const c10::optional<at::Tensor>& zr, const at::Tensor& labels,
                    const at::Tensor& scale, const at::Tensor& hc, const at::Tensor& w,
                    const c10::optional<at::Tensor>& bias,
                    const c10::optional<at::Tensor>& ref_bias, double softcap, int64_t ref_start,
                    int64_t stream) {
  check_cuda(z, z, "z");
  TORCH_CHECK(z.dim() == 2, "z must be (rows, V), got ", z.sizes());
  const int64_t R = z.size(0), V = z.size(1);
  const int code = dtype_code(z.scalar_type());
  TORCH_CHECK(ref_start >= 0 && ref_start <= R, "ref_start must be in [0, ", R, "], got ",
              ref_start);
  const bool has_zr = zr.has_value() && zr->defined();
  TORCH_CHECK(has_zr || ref_start == R, "reference logits are required when ref_start < rows");
  if (has_zr) {
    check_cuda(*zr, z, "zr");
    TORCH_CHECK(zr->scalar_type() == z.scalar_type(), "zr must have z's dtype ", z.scalar_type(),
                ", got ", zr->scalar_type());
    TORCH_CHECK(zr->dim() == 2 && zr->size(0) == R - ref_start && zr->size(1) == V,
                "zr must be (", R - ref_start, ", ", V, "), got ", zr->sizes());
  }
  check_cuda(labels, z, "labels");
  TORCH_CHECK(labels.scalar_type() == at::kLong && labels.dim() == 1 && labels.size(0) == R,
              "labels must be int64 (", R, ",), got ", labels.scalar_type(), " ", labels.sizes());
  check_cuda(scale, z, "scale");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.dim() == 1 && scale.size(0) == R,
              "scale must be float32 (", R, ",), got ", scale.scalar_type(), " ", scale.sizes());
  check_cuda(hc, z, "hidden rows");
  check_cuda(w, z, "weight");
  TORCH_CHECK(hc.scalar_type() == z.scalar_type() && w.scalar_type() == z.scalar_type(),
              "hidden rows and weight must have the logits' dtype ", z.scalar_type());
  TORCH_CHECK(hc.dim() == 2 && hc.size(0) == R, "hidden rows must be (", R, ", H), got ",
              hc.sizes());
  const int64_t H = hc.size(1);
  TORCH_CHECK(w.dim() == 2 && w.size(0) == V && w.size(1) == H, "weight must be (", V, ", ", H,
              "), got ", w.sizes());
  const float* bias_p = nullptr;
  const float* rbias_p = nullptr;
  if (bias.has_value() && bias->defined()) {
    check_cuda(*bias, z, "bias");
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->numel() == V,
                "bias must be float32 (", V, ",)");
    bias_p = bias->data_ptr<float>();
  }
  if (ref_bias.has_value() && ref_bias->defined()) {
    check_cuda(*ref_bias, z, "ref_bias");
    TORCH_CHECK(ref_bias->scalar_type() == at::kFloat && ref_bias->numel() == V,
                "ref_bias must be float32 (", V, ",)");
    rbias_p = ref_bias->data_ptr<float>();
  }
  TORCH_CHECK(R < (int64_t(1) << 31), "too many rows in one chunk: ", R);
  at::Tensor val = at::empty({R}, z.options().dtype(at::kFloat));
  const int err = fastunlearn_row_pass(
      code, z.data_ptr(), has_zr ? zr->data_ptr() : nullptr, R, ref_start, V,
      labels.data_ptr<int64_t>(), scale.data_ptr<float>(), hc.data_ptr(), w.data_ptr(), H, bias_p,
      rbias_p, softcap > 0 ? static_cast<float>(softcap) : 0.f, val.data_ptr<float>(),
      reinterpret_cast<void*>(static_cast<intptr_t>(stream)));
  TORCH_CHECK(err == 0, "fastunlearn row pass kernel launch failed: ",
              fastunlearn_cuda_error_string(err));
  return val;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastunlearn fused unlearning loss, CUDA row pass";
  m.def("row_pass", &row_pass, "Per-row NLL / KL and logit gradients in place (CUDA)",
        py::arg("z"), py::arg("zr"), py::arg("labels"), py::arg("scale"), py::arg("hc"),
        py::arg("w"), py::arg("bias"), py::arg("ref_bias"), py::arg("softcap"),
        py::arg("ref_start"), py::arg("stream"));
}
