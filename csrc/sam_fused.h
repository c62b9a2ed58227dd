// sam_fused native kernels: the three fused passes of a SAM step over lists of tensors.
//
// Every list holds tensors of one dtype on one device, each dense and sharing the strides of the
// matching parameter, so element i of a tensor is at data_ptr + i in every list. Math is done in
// fp32 (fp64 for double parameters) and stored back in the parameter's dtype.
//
//   sq_sum_         out (+)= sum over tensors of (T * g)^2, T = |w| + eta (ASAM) or 1, into a 0-dim
//                   fp64 tensor, from per-chunk partials summed in a fixed order (deterministic);
//                   products and sums in fp64, so the sum is finite whenever the norm fits fp32
//   perturb_        backup = w; w += rho * T^2 * g / (norm + 1e-12), skipped (and nothing saved)
//                   when norm is not finite
//                   (both with an optional AMP inv_scale: g *= inv_scale as it is read)
//   restore_update_ w = source, fused with torch.optim's SGD or Adam/AdamW update (opt 1, 2) or
//                   alone (opt 0), with the scalars folded by the host (sam_fused/spec.py); state1 = momentum_buffer / exp_avg, state2 = exp_avg_sq. With AMP
//                   tensors: g *= inv_scale as it is read; found_inf != 0 turns the pass into a restore.
//   dots_           out[0..2] (+)= sum g^2, sum g * aux, sum aux^2 over the tensors (GSAM, LookSAM)
//   msam_update_    Momentum-SAM's first pass: w += r * m (restore, r = rho * inv), the SGD or Adam/AdamW
//                   update (sam_math.h, msam_element), and out (+)= sum of the new m^2 (fp64, as stored);
//                   found_inf != 0: nothing written
//   msam_perturb_   Momentum-SAM's second pass: w -= rho * inv_next * m (nothing when found_inf != 0)
//
// The SAM variants' extra columns ride in the same passes: perturb_ may save the (unscaled) first
// gradient into ``save``; restore_update_ may combine the gradient with an ``aux`` buffer,
// g_eff = c0 * g + c1 * aux, and rewrite aux = c2 * g + c3 * aux, coef = [c0, c1, c2, c3] a
// 4-element fp32 tensor on the parameters' device (computed there from dots_: no host sync).
#pragma once

#include <torch/extension.h>

#include <vector>

#include "sam_constants.h"

namespace sam_fused {

// The update's kind and switches, and its scalars folded on the host in the order of
// constants.UPDATE_SCALARS (sam_math.h's UpdateScalars has the same fields in the same order).
struct UpdateArgs {
  int64_t opt;
  bool has_momentum, nesterov;
  std::vector<double> scalars;
  // AMP: both set (device or host pointers, as the tensors are), or both null
  const float* inv_scale = nullptr;
  const float* found_inf = nullptr;
  double grad_mul = 1.0;  // CPU: *inv_scale, read once on the host
  // GSAM / LookSAM: combine = 0 (the gradient as it is), 1 (g_eff = c0 g + c1 aux), 2 (and aux =
  // c2 g + c3 aux); coef points to [c0, c1, c2, c3] on the parameters' device
  int combine = 0;
  const float* coef = nullptr;
};

using TensorList = std::vector<at::Tensor>;

// inv_scale (AMP): null, or a one-element fp32 tensor on the parameters' device; the gradients are
// multiplied by it as they are read (sq_sum_) and the perturbation by it (perturb_).
// precond (the preconditioned perturbation; the CUDA kernels take it too): empty, or Adam's exp_avg_sq per parameter; each
// gradient is then divided by sqrt(v) * bc2_inv + eps, with eps passed as eta.
void sq_sum_cpu(at::Tensor& out, const TensorList& params, const TensorList& grads, bool adaptive, double eta,
                bool accumulate, const at::Tensor* inv_scale, const TensorList& precond, double bc2_inv);
void dots_cpu(at::Tensor& out, const TensorList& grads, const TensorList& aux, bool accumulate,
              const at::Tensor* inv_scale);
void perturb_cpu(const TensorList& params, const TensorList& grads, const TensorList& backups,
                 const TensorList& save, const at::Tensor& norm, double rho, bool adaptive, double eta,
                 const at::Tensor* inv_scale, const TensorList& precond, double bc2_inv);
void restore_update_cpu(const TensorList& params, const TensorList& grads, const TensorList& sources,
                        const TensorList& state1, const TensorList& state2, const TensorList& aux,
                        const UpdateArgs& u);

// Momentum-SAM (args: opt kOptSgd or kOptAdam, the folded scalars, AMP pointers; inv and inv_next are
// one-element fp32 tensors on the parameters' device).
void msam_update_cpu(at::Tensor& out, const TensorList& params, const TensorList& grads, const TensorList& m,
                     const TensorList& v, const UpdateArgs& args, bool restore, double rho, const at::Tensor& inv,
                     bool accumulate);
void msam_perturb_cpu(const TensorList& params, const TensorList& m, double rho, const at::Tensor& inv_next,
                      const float* found_inf);

#ifdef SAM_FUSED_WITH_CUDA
void msam_update_cuda(at::Tensor& out, const TensorList& params, const TensorList& grads, const TensorList& m,
                      const TensorList& v, const UpdateArgs& args, bool restore, double rho, const at::Tensor& inv,
                      bool accumulate, const at::Tensor* partials);
void msam_perturb_cuda(const TensorList& params, const TensorList& m, double rho, const at::Tensor& inv_next,
                       const float* found_inf);
// partials: scratch of at least one float per 65536-element chunk (no allocation in the step),
// or null (allocated here).
void sq_sum_cuda(at::Tensor& out, const TensorList& params, const TensorList& grads, bool adaptive, double eta,
                 bool accumulate, const at::Tensor* inv_scale, const at::Tensor* partials, const TensorList& precond,
                 double bc2_inv);
void dots_cuda(at::Tensor& out, const TensorList& grads, const TensorList& aux, bool accumulate,
               const at::Tensor* inv_scale, const at::Tensor* partials);
void perturb_cuda(const TensorList& params, const TensorList& grads, const TensorList& backups,
                  const TensorList& save, const at::Tensor& norm, double rho, bool adaptive, double eta,
                  const at::Tensor* inv_scale, const TensorList& precond, double bc2_inv);
void restore_update_cuda(const TensorList& params, const TensorList& grads, const TensorList& sources,
                         const TensorList& state1, const TensorList& state2, const TensorList& aux,
                         const UpdateArgs& u);
#endif

}  // namespace sam_fused
