// Per-element math of the fused passes, shared by the CPU and CUDA kernels so they cannot drift.
// acc_t is the math type: float for fp32/bf16/fp16 parameters, double for fp64.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define SAM_HD __host__ __device__ __forceinline__
#else
#define SAM_HD inline
#endif

namespace sam_fused {

// The scale rho / (norm + 1e-12), or 0 when the norm is not finite (the step is then skipped).
template <typename acc_t>
SAM_HD acc_t perturb_scale(float norm, double rho, bool* ok) {
  *ok = norm < INFINITY;  // false for inf and NaN; a norm is never negative
  return *ok ? static_cast<acc_t>(static_cast<float>(rho) / (norm + 1e-12f)) : acc_t(0);
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

// (T * g)^2
template <typename acc_t>
SAM_HD acc_t weighted_square(acc_t w, acc_t g, bool adaptive, acc_t eta) {
  if (adaptive) g = g * ((w < 0 ? -w : w) + eta);
  return g * g;
}

template <typename acc_t>
struct UpdateScalars {
  acc_t lr, weight_decay, momentum, one_minus_dampening;
  acc_t one_minus_beta1, beta2, one_minus_beta2, eps, step_size, bias_correction2_sqrt, decay;
  bool has_momentum, nesterov, maximize, first, decoupled;
};

template <typename acc_t, typename Args>
UpdateScalars<acc_t> update_scalars(const Args& u) {
  return UpdateScalars<acc_t>{
      acc_t(u.lr), acc_t(u.weight_decay), acc_t(u.momentum), acc_t(1.0 - u.dampening),
      acc_t(1.0 - u.beta1), acc_t(u.beta2), acc_t(1.0 - u.beta2), acc_t(u.eps), acc_t(u.step_size),
      acc_t(u.bias_correction2_sqrt), acc_t(u.decay),
      u.momentum != 0, u.nesterov, u.maximize, u.first, u.decoupled};
}

// torch.optim.SGD on one element: returns the new weight, updates the momentum buffer m.
template <typename acc_t>
SAM_HD acc_t sgd_element(const UpdateScalars<acc_t>& u, acc_t w, acc_t d, acc_t& m) {
  if (u.maximize) d = -d;
  d = d + u.weight_decay * w;
  if (u.has_momentum) {
    m = u.first ? d : m * u.momentum + u.one_minus_dampening * d;
    d = u.nesterov ? d + u.momentum * m : m;
  }
  return w - u.lr * d;
}

// torch.optim.Adam / AdamW (no amsgrad) on one element: new weight; updates exp_avg m, exp_avg_sq v.
template <typename acc_t>
SAM_HD acc_t adam_element(const UpdateScalars<acc_t>& u, acc_t w, acc_t d, acc_t& m, acc_t& v) {
  if (u.maximize) d = -d;
  if (u.decoupled) {
    w = w * u.decay;
  } else {
    d = d + u.weight_decay * w;
  }
  m = m + u.one_minus_beta1 * (d - m);
  v = v * u.beta2 + u.one_minus_beta2 * d * d;
  return w - u.step_size * (m / (std::sqrt(v) / u.bias_correction2_sqrt + u.eps));
}

}  // namespace sam_fused
