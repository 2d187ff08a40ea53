// Torch binding of the CUDA row pass (unlearn_loss_kernels.cu). Plain C++ with torch headers and
// no CUDA headers: the stream comes from Python as an integer handle, the device is set by the
// caller (torch.cuda.device), so this file compiles against a CPU-only torch as well (CI).
// The GEMMs (logits, dX, dW) run in fastunlearn/losses/cuda_backend.py through ATen / cuBLAS.
#include <torch/extension.h>

#include <cstdint>
#include <string>

extern "C" int fastunlearn_row_pass(int dtype, void* z, const void* zr, int64_t rows,
                                    int64_t ref_start, int64_t V, const int64_t* labels,
                                    const float* scale, const void* hc, const void* w, int64_t H,
                                    const float* bias, const float* ref_bias, float cap,
                                    float* val, void* stream);
extern "C" const char* fastunlearn_cuda_error_string(int code);

namespace {

// 0 fp32, 1 fp16, 2 bf16, -1 unsupported
int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return 0;
    case at::kHalf: return 1;
    case at::kBFloat16: return 2;
    default: return -1;
  }
}

// Every check returns its message instead of throwing: the Python wrapper calls check_row_pass
// first and raises there, so invalid input never depends on a C++ exception crossing into
// Python (on the H200 image a TORCH_CHECK failure in this extension crashed the process).
#define FU_REQUIRE(cond, ...) \
  if (!(cond)) return c10::str("fastunlearn cuda backend: ", __VA_ARGS__)

std::string tensor_error(const at::Tensor& t, const at::Tensor& like, const char* name,
                         bool require_cuda) {
  FU_REQUIRE(t.defined(), name, " is undefined");
  FU_REQUIRE(!require_cuda || t.is_cuda(), name, " must be a CUDA tensor, got ", t.device());
  FU_REQUIRE(t.device() == like.device(), name, " is on ", t.device(), " but the logits are on ",
             like.device());
  FU_REQUIRE(t.is_contiguous(), name, " must be contiguous");
  return "";
}

#define FU_TENSOR_OK(t, like, name)                                \
  do {                                                             \
    std::string e_ = tensor_error(t, like, name, require_cuda);    \
    if (!e_.empty()) return e_;                                    \
  } while (0)

}  // namespace

// Empty when row_pass may run on these inputs, else a one-line message. ``require_cuda=false``
// lets the CPU tests reach the checks after the device one.
std::string check_row_pass(const at::Tensor& z, const c10::optional<at::Tensor>& zr,
                           const at::Tensor& labels, const at::Tensor& scale, const at::Tensor& hc,
                           const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                           const c10::optional<at::Tensor>& ref_bias, int64_t ref_start,
                           bool require_cuda) {
  FU_TENSOR_OK(z, z, "z");
  FU_REQUIRE(z.dim() == 2, "z must be (rows, V), got ", z.sizes());
  const int64_t R = z.size(0), V = z.size(1);
  FU_REQUIRE(dtype_code(z.scalar_type()) >= 0,
             "logits must be float32, float16 or bfloat16, got ", z.scalar_type());
  FU_REQUIRE(ref_start >= 0 && ref_start <= R, "ref_start must be in [0, ", R, "], got ",
             ref_start);
  const bool has_zr = zr.has_value() && zr->defined();
  FU_REQUIRE(has_zr || ref_start == R, "reference logits are required when ref_start < rows");
  if (has_zr) {
    FU_TENSOR_OK(*zr, z, "zr");
    FU_REQUIRE(zr->scalar_type() == z.scalar_type(), "zr must have z's dtype ", z.scalar_type(),
               ", got ", zr->scalar_type());
    FU_REQUIRE(zr->dim() == 2 && zr->size(0) == R - ref_start && zr->size(1) == V,
               "zr must be (", R - ref_start, ", ", V, "), got ", zr->sizes());
  }
  FU_TENSOR_OK(labels, z, "labels");
  FU_REQUIRE(labels.scalar_type() == at::kLong && labels.dim() == 1 && labels.size(0) == R,
             "labels must be int64 (", R, ",), got ", labels.scalar_type(), " ", labels.sizes());
  FU_TENSOR_OK(scale, z, "scale");
  FU_REQUIRE(scale.scalar_type() == at::kFloat && scale.dim() == 1 && scale.size(0) == R,
             "scale must be float32 (", R, ",), got ", scale.scalar_type(), " ", scale.sizes());
  FU_TENSOR_OK(hc, z, "hidden rows");
  FU_TENSOR_OK(w, z, "weight");
  FU_REQUIRE(hc.scalar_type() == z.scalar_type() && w.scalar_type() == z.scalar_type(),
             "hidden rows and weight must have the logits' dtype ", z.scalar_type());
  FU_REQUIRE(hc.dim() == 2 && hc.size(0) == R, "hidden rows must be (", R, ", H), got ",
             hc.sizes());
  const int64_t H = hc.size(1);
  FU_REQUIRE(w.dim() == 2 && w.size(0) == V && w.size(1) == H, "weight must be (", V, ", ", H,
             "), got ", w.sizes());
  if (bias.has_value() && bias->defined()) {
    FU_TENSOR_OK(*bias, z, "bias");
    FU_REQUIRE(bias->scalar_type() == at::kFloat && bias->numel() == V, "bias must be float32 (",
               V, ",)");
  }
  if (ref_bias.has_value() && ref_bias->defined()) {
    FU_TENSOR_OK(*ref_bias, z, "ref_bias");
    FU_REQUIRE(ref_bias->scalar_type() == at::kFloat && ref_bias->numel() == V,
               "ref_bias must be float32 (", V, ",)");
  }
  FU_REQUIRE(R < (int64_t(1) << 31), "too many rows in one chunk: ", R);
  return "";
}

// z: (R, V) policy logits, overwritten with dz. zr: (R - ref_start, V) reference logits of the
// normal rows (the chunk's suffix) or None. labels (R) int64, scale (R) fp32, hc (R, H) hidden
// rows of the chunk and w (V, H) head, both in z's dtype (for the fp32 target logit).
// bias / ref_bias: (V) fp32 or None. Returns val (R) fp32: nll or kl per row.
// The same checks as check_row_pass, as a TORCH_CHECK for callers that skip that.
at::Tensor row_pass(at::Tensor z, const c10::optional<at::Tensor>& zr, const at::Tensor& labels,
                    const at::Tensor& scale, const at::Tensor& hc, const at::Tensor& w,
                    const c10::optional<at::Tensor>& bias,
                    const c10::optional<at::Tensor>& ref_bias, double softcap, int64_t ref_start,
                    int64_t stream) {
  const std::string error =
      check_row_pass(z, zr, labels, scale, hc, w, bias, ref_bias, ref_start, true);
  TORCH_CHECK(error.empty(), error);
  const int64_t R = z.size(0), V = z.size(1), H = hc.size(1);
  const bool has_zr = zr.has_value() && zr->defined();
  const float* bias_p = bias.has_value() && bias->defined() ? bias->data_ptr<float>() : nullptr;
  const float* rbias_p =
      ref_bias.has_value() && ref_bias->defined() ? ref_bias->data_ptr<float>() : nullptr;
  at::Tensor val = at::empty({R}, z.options().dtype(at::kFloat));
  const int err = fastunlearn_row_pass(
      dtype_code(z.scalar_type()), z.data_ptr(), has_zr ? zr->data_ptr() : nullptr, R, ref_start,
      V, labels.data_ptr<int64_t>(), scale.data_ptr<float>(), hc.data_ptr(), w.data_ptr(), H,
      bias_p, rbias_p, softcap > 0 ? static_cast<float>(softcap) : 0.f, val.data_ptr<float>(),
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
  m.def("check_row_pass", &check_row_pass,
        "The row pass's input checks: an empty string, or the message of the first that fails",
        py::arg("z"), py::arg("zr"), py::arg("labels"), py::arg("scale"), py::arg("hc"),
        py::arg("w"), py::arg("bias"), py::arg("ref_bias"), py::arg("ref_start"),
        py::arg("require_cuda") = true);
}
