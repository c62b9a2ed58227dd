// Python bindings of sam_fused._C: validate the tensor lists once, then run the CPU or CUDA kernels.
#include "sam_fused.h"

namespace sam_fused {
namespace {

// Each list is empty or as long as params; every tensor is dense, on params' device, with its
// parameter's dtype, numel and strides: flat indexing is then valid for all of them.
void check_lists(const char* op, const TensorList& params, std::initializer_list<const TensorList*> others) {
  for (const auto& p : params) {
    TORCH_CHECK(p.device() == params[0].device(), op, ": every tensor must be on ", params[0].device());
    TORCH_CHECK(p.scalar_type() == params[0].scalar_type(), op, ": one dtype per call");
    TORCH_CHECK(p.is_non_overlapping_and_dense(), op, ": parameters must be dense");
  }
  for (const TensorList* list : others) {
    if (list->empty()) continue;
    TORCH_CHECK(list->size() == params.size(), op, ": tensor lists of different lengths");
    for (size_t i = 0; i < params.size(); ++i) {
      const auto& t = (*list)[i];
      TORCH_CHECK(t.device() == params[i].device() && t.scalar_type() == params[i].scalar_type() &&
                      t.numel() == params[i].numel() && t.strides() == params[i].strides(),
                  op, ": tensor ", i, " does not match its parameter's device, dtype, size and strides");
    }
  }
}

bool on_cuda(const TensorList& params) {
  if (params.empty() || !params[0].is_cuda()) return false;
#ifdef SAM_FUSED_WITH_CUDA
  return true;
#else
  TORCH_CHECK(false, "sam_fused._C was built without CUDA kernels");
#endif
}

void check_scalar(const char* op, const char* name, const at::Tensor& t, const TensorList& params) {
  TORCH_CHECK(t.numel() == 1 && t.scalar_type() == at::kFloat, op, ": ", name, " must be a one-element float32 tensor");
  TORCH_CHECK(params.empty() || t.device() == params[0].device(), op, ": ", name, " must be on the parameters' device");
}

const at::Tensor* checked_inv_scale(const char* op, const c10::optional<at::Tensor>& inv_scale,
                                    const TensorList& params) {
  if (!inv_scale.has_value()) return nullptr;
  check_scalar(op, "inv_scale", *inv_scale, params);
  return &*inv_scale;
}

void sq_sum(at::Tensor out, const TensorList& params, const TensorList& grads, bool adaptive, double eta,
            bool accumulate, const c10::optional<at::Tensor>& inv_scale) {
  check_lists("sq_sum_", params, {&grads});
  TORCH_CHECK(grads.size() == params.size(), "sq_sum_: one grad per parameter");
  check_scalar("sq_sum_", "out", out, params);
  TORCH_CHECK(out.is_contiguous(), "sq_sum_: out must be contiguous");
  const at::Tensor* inv = checked_inv_scale("sq_sum_", inv_scale, params);
#ifdef SAM_FUSED_WITH_CUDA
  if (on_cuda(params)) return sq_sum_cuda(out, params, grads, adaptive, eta, accumulate, inv);
#else
  on_cuda(params);
#endif
  sq_sum_cpu(out, params, grads, adaptive, eta, accumulate, inv);
}

void perturb(const TensorList& params, const TensorList& grads, const TensorList& backups,
             const at::Tensor& norm, double rho, bool adaptive, double eta,
             const c10::optional<at::Tensor>& inv_scale) {
  check_lists("perturb_", params, {&grads, &backups});
  TORCH_CHECK(grads.size() == params.size() && backups.size() == params.size(),
              "perturb_: one grad and one backup per parameter");
  TORCH_CHECK(norm.numel() == 1 && (params.empty() || norm.device() == params[0].device()),
              "perturb_: norm must be a one-element tensor on the parameters' device");
  const at::Tensor* inv = checked_inv_scale("perturb_", inv_scale, params);
#ifdef SAM_FUSED_WITH_CUDA
  if (on_cuda(params)) return perturb_cuda(params, grads, backups, norm, rho, adaptive, eta, inv);
#else
  on_cuda(params);
#endif
  perturb_cpu(params, grads, backups, norm, rho, adaptive, eta, inv);
}

void restore_update(const TensorList& params, const TensorList& grads, const TensorList& sources,
                    const TensorList& state1, const TensorList& state2, UpdateArgs u,
                    const c10::optional<at::Tensor>& inv_scale, const c10::optional<at::Tensor>& found_inf) {
  check_lists("restore_update_", params, {&grads, &sources, &state1, &state2});
  TORCH_CHECK(inv_scale.has_value() == found_inf.has_value(), "restore_update_: inv_scale and found_inf go together");
  if (inv_scale.has_value()) {
    check_scalar("restore_update_", "inv_scale", *inv_scale, params);
    check_scalar("restore_update_", "found_inf", *found_inf, params);
    u.inv_scale = inv_scale->data_ptr<float>();
    u.found_inf = found_inf->data_ptr<float>();
  }
  TORCH_CHECK(u.opt >= kOptRestore && u.opt <= kOptAdam, "restore_update_: unknown opt ", u.opt);
  TORCH_CHECK(u.scalars.size() == kUpdateScalars, "restore_update_: expected ", kUpdateScalars, " scalars, got ",
              u.scalars.size());
  TORCH_CHECK(sources.size() == params.size(), "restore_update_: one source per parameter");
  TORCH_CHECK(u.opt == kOptRestore || grads.size() == params.size(), "restore_update_: one grad per parameter");
  TORCH_CHECK(u.opt != kOptAdam || (state1.size() == params.size() && state2.size() == params.size()),
              "restore_update_: Adam needs exp_avg and exp_avg_sq");
  TORCH_CHECK(u.opt != kOptSgd || !u.has_momentum || state1.size() == params.size(),
              "restore_update_: SGD with momentum needs momentum buffers");
#ifdef SAM_FUSED_WITH_CUDA
  if (on_cuda(params)) return restore_update_cuda(params, grads, sources, state1, state2, u);
#else
  on_cuda(params);
#endif
  restore_update_cpu(params, grads, sources, state1, state2, u);
}

}  // namespace
}  // namespace sam_fused

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  using namespace sam_fused;
  m.doc() = "sam_fused native kernels: global grad norm, perturb with backup, restore + update";
  m.def("sq_sum_", &sq_sum, "out = sum of (T g)^2 over the tensors (out += with accumulate)", py::arg("out"),
        py::arg("params"), py::arg("grads"), py::kw_only(), py::arg("adaptive"), py::arg("eta"),
        py::arg("accumulate") = false, py::arg("inv_scale") = py::none());
  m.def("perturb_", &perturb, "backup = w; w += e (skipped when norm is not finite)", py::arg("params"),
        py::arg("grads"), py::arg("backups"), py::kw_only(), py::arg("norm"), py::arg("rho"),
        py::arg("adaptive"), py::arg("eta"), py::arg("inv_scale") = py::none());
  m.def(
      "restore_update_",
      [](const TensorList& params, const TensorList& grads, const TensorList& sources, const TensorList& state1,
         const TensorList& state2, int64_t opt, bool has_momentum, bool nesterov, std::vector<double> scalars,
         const c10::optional<at::Tensor>& inv_scale, const c10::optional<at::Tensor>& found_inf) {
        UpdateArgs u;
        u.opt = opt;
        u.has_momentum = has_momentum;
        u.nesterov = nesterov;
        u.scalars = std::move(scalars);
        restore_update(params, grads, sources, state1, state2, u, inv_scale, found_inf);
      },
      "w = source, fused with the SGD (opt 1) or Adam/AdamW (opt 2) update, or alone (opt 0); scalars folded "
      "by the host (sam_fused.constants.UPDATE_SCALARS); optional AMP inv_scale / found_inf tensors",
      py::arg("params"), py::arg("grads"), py::arg("sources"), py::arg("state1"), py::arg("state2"), py::kw_only(),
      py::arg("opt"), py::arg("has_momentum"), py::arg("nesterov"), py::arg("scalars"),
      py::arg("inv_scale") = py::none(), py::arg("found_inf") = py::none());
  m.def("has_cuda", [] {
#ifdef SAM_FUSED_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
}
