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

// A scratch buffer of `dtype` on the parameters' device, or null.
const at::Tensor* checked_partials(const char* op, const c10::optional<at::Tensor>& partials,
                                   const TensorList& params, at::ScalarType dtype) {
  if (!partials.has_value()) return nullptr;
  TORCH_CHECK(partials->scalar_type() == dtype && partials->is_contiguous() &&
                  (params.empty() || partials->device() == params[0].device()),
              op, ": partials must be a contiguous ", dtype, " tensor on the parameters' device");
  return &*partials;
}

void sq_sum(at::Tensor out, const TensorList& params, const TensorList& grads, bool adaptive, double eta,
            bool accumulate, const c10::optional<at::Tensor>& inv_scale, const c10::optional<at::Tensor>& partials,
            const TensorList& precond, double bc2_inv) {
  check_lists("sq_sum_", params, {&grads, &precond});
  TORCH_CHECK(precond.empty() || !adaptive, "sq_sum_: precond and adaptive exclude each other");
  TORCH_CHECK(grads.size() == params.size(), "sq_sum_: one grad per parameter");
  // fp64: the sum of squares of gradients whose norm fits fp32 can exceed fp32's range
  TORCH_CHECK(out.numel() == 1 && out.scalar_type() == at::kDouble && out.is_contiguous(),
              "sq_sum_: out must be a contiguous one-element float64 tensor");
  TORCH_CHECK(params.empty() || out.device() == params[0].device(), "sq_sum_: out must be on the parameters' device");
  const at::Tensor* inv = checked_inv_scale("sq_sum_", inv_scale, params);
  const at::Tensor* scratch = checked_partials("sq_sum_", partials, params, at::kDouble);
#ifdef SAM_FUSED_WITH_CUDA
  if (on_cuda(params)) {
    return sq_sum_cuda(out, params, grads, adaptive, eta, accumulate, inv, scratch, precond, bc2_inv);
  }
#else
  on_cuda(params);
  (void)scratch;
#endif
  sq_sum_cpu(out, params, grads, adaptive, eta, accumulate, inv, precond, bc2_inv);
}

void dots(at::Tensor out, const TensorList& grads, const TensorList& aux, bool accumulate,
          const c10::optional<at::Tensor>& inv_scale, const c10::optional<at::Tensor>& partials) {
  check_lists("dots_", grads, {&aux});
  TORCH_CHECK(aux.size() == grads.size(), "dots_: one aux buffer per gradient");
  TORCH_CHECK(out.numel() == 3 && out.scalar_type() == at::kFloat && out.is_contiguous() &&
                  (grads.empty() || out.device() == grads[0].device()),
              "dots_: out must be a contiguous 3-element float32 tensor on the gradients' device");
  const at::Tensor* inv = checked_inv_scale("dots_", inv_scale, grads);
  const at::Tensor* scratch = checked_partials("dots_", partials, grads, at::kFloat);
#ifdef SAM_FUSED_WITH_CUDA
  if (on_cuda(grads)) return dots_cuda(out, grads, aux, accumulate, inv, scratch);
#else
  on_cuda(grads);
  (void)scratch;
#endif
  dots_cpu(out, grads, aux, accumulate, inv);
}

void perturb(const TensorList& params, const TensorList& grads, const TensorList& backups, const TensorList& save,
             const at::Tensor& norm, double rho, bool adaptive, double eta,
             const c10::optional<at::Tensor>& inv_scale, const TensorList& precond, double bc2_inv) {
  check_lists("perturb_", params, {&grads, &backups, &save, &precond});
  TORCH_CHECK(precond.empty() || !adaptive, "perturb_: precond and adaptive exclude each other");
  TORCH_CHECK(grads.size() == params.size() && backups.size() == params.size(),
              "perturb_: one grad and one backup per parameter");
  TORCH_CHECK(norm.numel() == 1 && (params.empty() || norm.device() == params[0].device()),
              "perturb_: norm must be a one-element tensor on the parameters' device");
  const at::Tensor* inv = checked_inv_scale("perturb_", inv_scale, params);
#ifdef SAM_FUSED_WITH_CUDA
  if (on_cuda(params)) {
    return perturb_cuda(params, grads, backups, save, norm, rho, adaptive, eta, inv, precond, bc2_inv);
  }
#else
  on_cuda(params);
#endif
  perturb_cpu(params, grads, backups, save, norm, rho, adaptive, eta, inv, precond, bc2_inv);
}

void restore_update(const TensorList& params, const TensorList& grads, const TensorList& sources,
                    const TensorList& state1, const TensorList& state2, const TensorList& aux, UpdateArgs u,
                    const c10::optional<at::Tensor>& inv_scale, const c10::optional<at::Tensor>& found_inf,
                    const c10::optional<at::Tensor>& coef) {
  check_lists("restore_update_", params, {&grads, &sources, &state1, &state2, &aux});
  TORCH_CHECK(u.combine >= 0 && u.combine <= 2, "restore_update_: combine must be 0, 1 or 2");
  if (u.combine != 0 && u.opt != kOptRestore) {
    TORCH_CHECK(coef.has_value() && coef->numel() == 4 && coef->scalar_type() == at::kFloat &&
                    coef->is_contiguous() && (params.empty() || coef->device() == params[0].device()),
                "restore_update_: combine needs coef, a contiguous 4-element float32 tensor on the parameters' device");
    TORCH_CHECK(aux.size() == params.size(), "restore_update_: combine needs one aux buffer per parameter");
    u.coef = coef->data_ptr<float>();
  } else {
    u.combine = 0;
  }
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
  if (on_cuda(params)) return restore_update_cuda(params, grads, sources, state1, state2, aux, u);
#else
  on_cuda(params);
#endif
  restore_update_cpu(params, grads, sources, state1, state2, aux, u);
}

void msam_update(at::Tensor out, const TensorList& params, const TensorList& grads, const TensorList& m,
                 const TensorList& v, int64_t opt, std::vector<double> scalars, bool restore, double rho,
                 const at::Tensor& inv, bool accumulate, const c10::optional<at::Tensor>& inv_scale,
                 const c10::optional<at::Tensor>& found_inf, const c10::optional<at::Tensor>& partials) {
  check_lists("msam_update_", params, {&grads, &m, &v});
  TORCH_CHECK(opt == kOptSgd || opt == kOptAdam, "msam_update_: opt must be SGD or Adam, got ", opt);
  TORCH_CHECK(grads.size() == params.size() && m.size() == params.size(),
              "msam_update_: one grad and one first moment per parameter");
  TORCH_CHECK(opt != kOptAdam || v.size() == params.size(), "msam_update_: Adam needs exp_avg_sq");
  TORCH_CHECK(scalars.size() == kUpdateScalars, "msam_update_: expected ", kUpdateScalars, " scalars");
  TORCH_CHECK(out.numel() == 1 && out.scalar_type() == at::kDouble && out.is_contiguous() &&
                  (params.empty() || out.device() == params[0].device()),
              "msam_update_: out must be a contiguous one-element float64 tensor on the parameters' device");
  check_scalar("msam_update_", "inv", inv, params);
  UpdateArgs u;
  u.opt = opt;
  u.has_momentum = true;
  u.nesterov = false;
  u.scalars = std::move(scalars);
  TORCH_CHECK(inv_scale.has_value() == found_inf.has_value(), "msam_update_: inv_scale and found_inf go together");
  if (inv_scale.has_value()) {
    check_scalar("msam_update_", "inv_scale", *inv_scale, params);
    check_scalar("msam_update_", "found_inf", *found_inf, params);
    u.inv_scale = inv_scale->data_ptr<float>();
    u.found_inf = found_inf->data_ptr<float>();
  }
  const at::Tensor* scratch = checked_partials("msam_update_", partials, params, at::kDouble);
  if (params.empty()) {
    if (!accumulate) out.zero_();
    return;
  }
#ifdef SAM_FUSED_WITH_CUDA
  if (on_cuda(params)) return msam_update_cuda(out, params, grads, m, v, u, restore, rho, inv, accumulate, scratch);
#else
  on_cuda(params);
  (void)scratch;
#endif
  msam_update_cpu(out, params, grads, m, v, u, restore, rho, inv, accumulate);
}

void msam_perturb(const TensorList& params, const TensorList& m, double rho, const at::Tensor& inv_next,
                  const c10::optional<at::Tensor>& found_inf) {
  check_lists("msam_perturb_", params, {&m});
  TORCH_CHECK(m.size() == params.size(), "msam_perturb_: one first moment per parameter");
  check_scalar("msam_perturb_", "inv_next", inv_next, params);
  const float* found = nullptr;
  if (found_inf.has_value()) {
    check_scalar("msam_perturb_", "found_inf", *found_inf, params);
    found = found_inf->data_ptr<float>();
  }
  if (params.empty()) return;
#ifdef SAM_FUSED_WITH_CUDA
  if (on_cuda(params)) return msam_perturb_cuda(params, m, rho, inv_next, found);
#else
  on_cuda(params);
#endif
  msam_perturb_cpu(params, m, rho, inv_next, found);
}

}  // namespace
}  // namespace sam_fused

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  using namespace sam_fused;
  m.doc() = "sam_fused native kernels: global grad norm, perturb with backup, restore + update";
  m.def("sq_sum_", &sq_sum, "out = sum of (T g)^2 over the tensors (out += with accumulate)", py::arg("out"),
        py::arg("params"), py::arg("grads"), py::kw_only(), py::arg("adaptive"), py::arg("eta"),
        py::arg("accumulate") = false, py::arg("inv_scale") = py::none(), py::arg("partials") = py::none(),
        py::arg("precond") = TensorList{}, py::arg("bc2_inv") = 1.0);
  m.def("dots_", &dots, "out[0..2] (+)= sum g^2, sum g*aux, sum aux^2 (g times inv_scale when given)",
        py::arg("out"), py::arg("grads"), py::arg("aux"), py::kw_only(), py::arg("accumulate") = false,
        py::arg("inv_scale") = py::none(), py::arg("partials") = py::none());
  m.def("perturb_", &perturb, "backup = w; [save = g * inv_scale;] w += e (skipped when norm is not finite)",
        py::arg("params"), py::arg("grads"), py::arg("backups"), py::arg("save"), py::kw_only(), py::arg("norm"),
        py::arg("rho"), py::arg("adaptive"), py::arg("eta"), py::arg("inv_scale") = py::none(),
        py::arg("precond") = TensorList{}, py::arg("bc2_inv") = 1.0);
  m.def(
      "restore_update_",
      [](const TensorList& params, const TensorList& grads, const TensorList& sources, const TensorList& state1,
         const TensorList& state2, const TensorList& aux, int64_t opt, bool has_momentum, bool nesterov,
         std::vector<double> scalars, const c10::optional<at::Tensor>& inv_scale,
         const c10::optional<at::Tensor>& found_inf, int64_t combine, const c10::optional<at::Tensor>& coef) {
        UpdateArgs u;
        u.opt = opt;
        u.has_momentum = has_momentum;
        u.nesterov = nesterov;
        u.scalars = std::move(scalars);
        u.combine = static_cast<int>(combine);
        restore_update(params, grads, sources, state1, state2, aux, u, inv_scale, found_inf, coef);
      },
      "w = source, fused with the SGD (opt 1) or Adam/AdamW (opt 2) update, or alone (opt 0); scalars folded "
      "by the host (sam_fused.constants.UPDATE_SCALARS); optional AMP inv_scale / found_inf tensors",
      py::arg("params"), py::arg("grads"), py::arg("sources"), py::arg("state1"), py::arg("state2"),
      py::arg("aux") = TensorList{}, py::kw_only(), py::arg("opt"), py::arg("has_momentum"), py::arg("nesterov"),
      py::arg("scalars"), py::arg("inv_scale") = py::none(), py::arg("found_inf") = py::none(),
      py::arg("combine") = 0, py::arg("coef") = py::none());
  m.def("msam_update_", &msam_update,
        "Momentum-SAM's first pass: restore (w += rho * inv * m), SGD or Adam/AdamW update, out (+)= sum m^2",
        py::arg("out"), py::arg("params"), py::arg("grads"), py::arg("m"), py::arg("v"), py::kw_only(),
        py::arg("opt"), py::arg("scalars"), py::arg("restore"), py::arg("rho"), py::arg("inv"),
        py::arg("accumulate") = false, py::arg("inv_scale") = py::none(), py::arg("found_inf") = py::none(),
        py::arg("partials") = py::none());
  m.def("msam_perturb_", &msam_perturb, "Momentum-SAM's second pass: w -= rho * inv_next * m", py::arg("params"),
        py::arg("m"), py::kw_only(), py::arg("rho"), py::arg("inv_next"), py::arg("found_inf") = py::none());
  m.def("has_cuda", [] {
#ifdef SAM_FUSED_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
}
