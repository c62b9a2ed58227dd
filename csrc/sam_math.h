// Per-element math of the fused passes, shared by the CPU and CUDA kernels so they cannot drift.
// acc_t is the math type: float for fp32/bf16/fp16 parameters, double for fp64.
#pragma once

#include <cmath>
#include <cstdint>

#include "sam_constants.h"

#if defined(__CUDACC__)
#define SAM_HD __host__ __device__ __forceinline__
#else
#define SAM_HD inline
#endif

namespace sam_fused {

// The scale rho / (norm + kNormEps) * grad_mul (grad_mul: AMP's 1 / loss scale, else 1), or 0 when
// the norm is not finite (the step is then skipped).
template <typename acc_t>
SAM_HD acc_t perturb_scale(float norm, double rho, float grad_mul, bool* ok) {
  *ok = norm < INFINITY;  // false for inf and NaN; a norm is never negative
  return *ok ? static_cast<acc_t>(static_cast<float>(rho) / (norm + kNormEps) * grad_mul) : acc_t(0);
}

// e = T^2 * g * scale, T = |w| + eta for ASAM, 1 for SAM.
template <typename acc_t>
SAM_HD acc_t perturbation(acc_t w, acc_t g, acc_t scale, bool adaptive, acc_t eta) {
  if (adaptive) {
    acc_t t = (w < 0 ? -w : w) + eta;
    return t * t * g * scale;
  }
  return g * scale;
}

// The preconditioned perturbation's 1 / P, P = Adam's denominator sqrt(v) / sqrt(1 - beta2^t) + eps
// (bc2_inv = 1 / sqrt(1 - beta2^t), v = exp_avg_sq after the last update).
template <typename acc_t>
SAM_HD acc_t inverse_adam_denominator(acc_t v, acc_t bc2_inv, acc_t eps) {
  return acc_t(1) / (sqrt(v) * bc2_inv + eps);
}

// (T * g)^2
template <typename acc_t>
SAM_HD acc_t weighted_square(acc_t w, acc_t g, bool adaptive, acc_t eta) {
  if (adaptive) g = g * ((w < 0 ? -w : w) + eta);
  return g * g;
}

// Scalars of the update, folded on the host (sam_fused/spec.py, Update.scalars), in the order of
// constants.UPDATE_SCALARS: the element functions have no data-dependent branch.
//   sign = -1 for maximize (times the AMP gradient multiplier 1 / loss scale);  l2 = weight_decay
//   unless decoupled;  decay = 1 - lr * weight_decay for AdamW, else 1;  SGD's buffer update
//   m = m * keep + coef * d, (keep, coef) = (0, 1) on the first step (the buffer starts zeroed).
template <typename acc_t>
struct UpdateScalars {
  acc_t sign, lr, l2, decay, momentum, keep, coef;
  acc_t one_minus_beta1, beta2, one_minus_beta2, eps, step_size, bias_correction2_sqrt;
};

template <typename acc_t, typename Args>
UpdateScalars<acc_t> update_scalars(const Args& u) {
  const auto& s = u.scalars;
  return UpdateScalars<acc_t>{acc_t(s[0] * u.grad_mul), acc_t(s[1]), acc_t(s[2]), acc_t(s[3]), acc_t(s[4]),
                              acc_t(s[5]), acc_t(s[6]), acc_t(s[7]), acc_t(s[8]), acc_t(s[9]), acc_t(s[10]),
                              acc_t(s[11]), acc_t(s[12])};
}

// torch.optim.SGD on one element: returns the new weight, updates the momentum buffer m.
template <typename acc_t, bool HAS_MOMENTUM, bool NESTEROV>
SAM_HD acc_t sgd_element(const UpdateScalars<acc_t>& u, acc_t w, acc_t d, acc_t& m) {
  d = d * u.sign + u.l2 * w;
  if (HAS_MOMENTUM) {
    m = m * u.keep + u.coef * d;
    d = NESTEROV ? d + u.momentum * m : m;
  }
  return w - u.lr * d;
}

// torch.optim.Adam / AdamW (no amsgrad) on one element: new weight; updates exp_avg m, exp_avg_sq v.
template <typename acc_t>
SAM_HD acc_t adam_element(const UpdateScalars<acc_t>& u, acc_t w, acc_t d, acc_t& m, acc_t& v) {
  d = d * u.sign + u.l2 * w;
  w = w * u.decay;
  m = m + u.one_minus_beta1 * (d - m);
  v = v * u.beta2 + u.one_minus_beta2 * d * d;
  return w - u.step_size * (m / (std::sqrt(v) / u.bias_correction2_sqrt + u.eps));
}

// Momentum-SAM's first pass on one element (sam_fused/backends/reference.py, MSAM_RULES): d = g * sign + l2 * w at
// the perturbed weights, the restore w + r * m with the old m (RESTORE), then SGD's m = m * keep +
// coef * d, w -= lr * m, or Adam's step followed by AdamW's decay w *= decay (the authors' order).
// Returns the new weight; updates m (and v for Adam).
template <typename acc_t, bool ADAM, bool RESTORE>
SAM_HD acc_t msam_element(const UpdateScalars<acc_t>& u, acc_t w, acc_t g, acc_t r, acc_t& m, acc_t& v) {
  const acc_t d = g * u.sign + u.l2 * w;
  if (RESTORE) w = w + r * m;
  if (!ADAM) {
    m = m * u.keep + u.coef * d;
    return w - u.lr * m;
  }
  m = m + u.one_minus_beta1 * (d - m);
  v = v * u.beta2 + u.one_minus_beta2 * d * d;
  w = w - u.step_size * (m / (std::sqrt(v) / u.bias_correction2_sqrt + u.eps));
  return w * u.decay;
}

}  // namespace sam_fused
