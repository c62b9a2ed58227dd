// CPU kernels (inputs validated by bindings.cpp): each pass is one parallel loop over fixed
// 16384-element chunks of every tensor, so a SAM step reads and writes each array the minimal
// number of times (40 B/param for SAM + SGD-momentum in fp32) instead of once per torch op.
#include "sam_fused.h"
#include "sam_math.h"

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <cstring>

namespace sam_fused {
namespace {

constexpr int64_t kChunk = 16384;
constexpr int kLanes = 16;  // independent partial sums: lets the compiler vectorize the reduction

struct Chunk {
  int64_t tensor, begin, end;
};

std::vector<Chunk> make_chunks(const TensorList& ts) {
  std::vector<Chunk> chunks;
  for (int64_t t = 0; t < static_cast<int64_t>(ts.size()); ++t) {
    const int64_t n = ts[t].numel();
    for (int64_t b = 0; b < n; b += kChunk) chunks.push_back({t, b, std::min(n, b + kChunk)});
  }
  return chunks;
}

template <typename scalar_t>
scalar_t* ptr(const TensorList& list, int64_t i) {
  return list.empty() ? nullptr : static_cast<scalar_t*>(list[i].data_ptr());
}

// Products and sums in double for every dtype: finite whenever the norm fits fp32. PRECOND: each
// gradient times 1 / (sqrt(v) * bc2_inv + eps), v the preconditioner list (Adam's exp_avg_sq).
template <typename scalar_t, bool ADAPTIVE, bool PRECOND = false>
void sq_sum_chunks(const std::vector<Chunk>& chunks, const TensorList& params, const TensorList& grads, double eta,
                   float grad_mul, std::vector<double>& partial, const TensorList& precond = {},
                   double bc2_inv = 1.0) {
  const double m = grad_mul;
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      const Chunk& ch = chunks[c];
      const scalar_t* g = ptr<scalar_t>(grads, ch.tensor);
      const scalar_t* w = ptr<scalar_t>(params, ch.tensor);
      double lanes[kLanes] = {};
      int64_t i = ch.begin;
      if constexpr (PRECOND) {  // lane-unrolled as below, so that the loop vectorizes
        // 1 / P in the element's math type (fp32: 8 lanes of sqrt and division per AVX2 op), the
        // products and sums in double
        using acc_t = at::opmath_type<scalar_t>;
        const scalar_t* v = ptr<scalar_t>(precond, ch.tensor);
        const acc_t b = acc_t(bc2_inv), e = acc_t(eta);
        for (; i + kLanes <= ch.end; i += kLanes) {
          for (int k = 0; k < kLanes; ++k) {
            const double x = double(g[i + k]) * m * double(inverse_adam_denominator<acc_t>(acc_t(v[i + k]), b, e));
            lanes[k] += x * x;
          }
        }
        for (; i < ch.end; ++i) {
          const double x = double(g[i]) * m * double(inverse_adam_denominator<acc_t>(acc_t(v[i]), b, e));
          lanes[0] += x * x;
        }
      }
      for (; i + kLanes <= ch.end; i += kLanes) {
        for (int k = 0; k < kLanes; ++k)
          lanes[k] += weighted_square<double>(double(w[i + k]), double(g[i + k]) * m, ADAPTIVE, eta);
      }
      for (; i < ch.end; ++i) lanes[0] += weighted_square<double>(double(w[i]), double(g[i]) * m, ADAPTIVE, eta);
      double s = 0;
      for (int k = 0; k < kLanes; ++k) s += lanes[k];
      partial[c] = s;
    }
  });
}

// out[0..2] += sum g^2, sum g * aux, sum aux^2 (g times AMP's grad_mul), per chunk into partial.
template <typename scalar_t>
void dots_chunks(const std::vector<Chunk>& chunks, const TensorList& grads, const TensorList& aux, float grad_mul,
                 std::vector<double>& partial) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t m = acc_t(grad_mul);
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      const Chunk& ch = chunks[c];
      const scalar_t* g = ptr<scalar_t>(grads, ch.tensor);
      const scalar_t* a = ptr<scalar_t>(aux, ch.tensor);
      acc_t gg[kLanes] = {}, ga[kLanes] = {}, aa[kLanes] = {};
      int64_t i = ch.begin;
      for (; i + kLanes <= ch.end; i += kLanes) {
        for (int k = 0; k < kLanes; ++k) {
          const acc_t x = acc_t(g[i + k]) * m, y = acc_t(a[i + k]);
          gg[k] += x * x;
          ga[k] += x * y;
          aa[k] += y * y;
        }
      }
      for (; i < ch.end; ++i) {
        const acc_t x = acc_t(g[i]) * m, y = acc_t(a[i]);
        gg[0] += x * x;
        ga[0] += x * y;
        aa[0] += y * y;
      }
      acc_t s0 = 0, s1 = 0, s2 = 0;
      for (int k = 0; k < kLanes; ++k) {
        s0 += gg[k];
        s1 += ga[k];
        s2 += aa[k];
      }
      partial[3 * c] = static_cast<double>(s0);
      partial[3 * c + 1] = static_cast<double>(s1);
      partial[3 * c + 2] = static_cast<double>(s2);
    }
  });
}

template <typename scalar_t, bool ADAPTIVE, bool PRECOND = false>
void perturb_chunks(const std::vector<Chunk>& chunks, const TensorList& params, const TensorList& grads,
                    const TensorList& backups, const TensorList& save, float norm, double rho, double eta,
                    float grad_mul, const TensorList& precond = {}, double bc2_inv = 1.0) {
  using acc_t = at::opmath_type<scalar_t>;
  bool ok;
  const acc_t scale = perturb_scale<acc_t>(norm, rho, grad_mul, &ok);
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      const Chunk& ch = chunks[c];
      scalar_t* __restrict__ w = ptr<scalar_t>(params, ch.tensor);
      const scalar_t* __restrict__ g = ptr<scalar_t>(grads, ch.tensor);
      scalar_t* __restrict__ b = ptr<scalar_t>(backups, ch.tensor);
      std::memcpy(b + ch.begin, w + ch.begin, (ch.end - ch.begin) * sizeof(scalar_t));
      scalar_t* __restrict__ sv = ptr<scalar_t>(save, ch.tensor);
      if (sv != nullptr && ok) {  // GSAM / LookSAM keep the first gradient, unscaled (not a non-finite one)
        if (grad_mul == 1.f) {
          std::memcpy(sv + ch.begin, g + ch.begin, (ch.end - ch.begin) * sizeof(scalar_t));
        } else {
          for (int64_t i = ch.begin; i < ch.end; ++i) sv[i] = scalar_t(acc_t(g[i]) * acc_t(grad_mul));
        }
      }
      if (!ok) continue;  // non-finite norm: the weights stay as they are
      if constexpr (PRECOND) {  // e = g * scale / P (eta holds Adam's eps)
        const scalar_t* __restrict__ v = ptr<scalar_t>(precond, ch.tensor);
        for (int64_t i = ch.begin; i < ch.end; ++i) {
          const acc_t x = acc_t(w[i]);
          w[i] = scalar_t(x + acc_t(g[i]) * scale *
                                  inverse_adam_denominator<acc_t>(acc_t(v[i]), acc_t(bc2_inv), acc_t(eta)));
        }
        continue;
      }
      for (int64_t i = ch.begin; i < ch.end; ++i) {
        const acc_t x = acc_t(w[i]);
        w[i] = scalar_t(x + perturbation<acc_t>(x, acc_t(g[i]), scale, ADAPTIVE, acc_t(eta)));
      }
    }
  });
}

}  // namespace

// AMP's multiplier of the gradients: a CPU tensor, read on the host (no device synchronization).
static float grad_mul_of(const at::Tensor* inv_scale) { return inv_scale == nullptr ? 1.f : *inv_scale->data_ptr<float>(); }

void sq_sum_cpu(at::Tensor& out, const TensorList& params, const TensorList& grads, bool adaptive, double eta,
                bool accumulate, const at::Tensor* inv_scale, const TensorList& precond, double bc2_inv) {
  const float grad_mul = grad_mul_of(inv_scale);
  const auto chunks = make_chunks(params);
  std::vector<double> partial(chunks.size(), 0.0);
  if (!chunks.empty()) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, params[0].scalar_type(), "sq_sum_cpu", [&] {
      if (!precond.empty()) {
        sq_sum_chunks<scalar_t, false, true>(chunks, params, grads, eta, grad_mul, partial, precond, bc2_inv);
      } else if (adaptive) {
        sq_sum_chunks<scalar_t, true>(chunks, params, grads, eta, grad_mul, partial);
      } else {
        sq_sum_chunks<scalar_t, false>(chunks, params, grads, eta, grad_mul, partial);
      }
    });
  }
  double total = 0.0;  // fixed order: the same gradients give the same bits, whatever the threads
  for (double v : partial) total += v;
  double* dst = out.data_ptr<double>();
  *dst = accumulate ? *dst + total : total;
}

void dots_cpu(at::Tensor& out, const TensorList& grads, const TensorList& aux, bool accumulate,
              const at::Tensor* inv_scale) {
  const float grad_mul = grad_mul_of(inv_scale);
  const auto chunks = make_chunks(grads);
  std::vector<double> partial(3 * chunks.size(), 0.0);
  if (!chunks.empty()) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grads[0].scalar_type(), "dots_cpu", [&] {
      dots_chunks<scalar_t>(chunks, grads, aux, grad_mul, partial);
    });
  }
  double total[3] = {0.0, 0.0, 0.0};  // fixed order
  for (size_t c = 0; c < chunks.size(); ++c)
    for (int k = 0; k < 3; ++k) total[k] += partial[3 * c + k];
  float* dst = out.data_ptr<float>();
  for (int k = 0; k < 3; ++k)
    dst[k] = accumulate ? static_cast<float>(static_cast<double>(dst[k]) + total[k]) : static_cast<float>(total[k]);
}

void perturb_cpu(const TensorList& params, const TensorList& grads, const TensorList& backups,
                 const TensorList& save, const at::Tensor& norm, double rho, bool adaptive, double eta,
                 const at::Tensor* inv_scale, const TensorList& precond, double bc2_inv) {
  const float grad_mul = grad_mul_of(inv_scale);
  const float norm_v = norm.to(at::kFloat).item<float>();  // a CPU tensor: no device synchronization
  const auto chunks = make_chunks(params);
  if (chunks.empty()) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, params[0].scalar_type(), "perturb_cpu", [&] {
    if (!precond.empty()) {
      perturb_chunks<scalar_t, false, true>(chunks, params, grads, backups, save, norm_v, rho, eta, grad_mul, precond,
                                            bc2_inv);
    } else if (adaptive) {
      perturb_chunks<scalar_t, true>(chunks, params, grads, backups, save, norm_v, rho, eta, grad_mul);
    } else {
      perturb_chunks<scalar_t, false>(chunks, params, grads, backups, save, norm_v, rho, eta, grad_mul);
    }
  });
}

namespace {

// OPT: kOptRestore, kOptSgd or kOptAdam; the SGD switches are template arguments too, so that
// each loop body is straight-line code the compiler vectorizes.
// COMBINE: 0, or GSAM / LookSAM's combination with aux (1), rewriting aux too (2).
template <typename scalar_t, int64_t OPT, bool HAS_MOMENTUM, bool NESTEROV, int COMBINE>
void update_chunks(const std::vector<Chunk>& chunks, const TensorList& params, const TensorList& grads,
                   const TensorList& sources, const TensorList& state1, const TensorList& state2,
                   const TensorList& aux, const UpdateArgs& args) {
  using acc_t = at::opmath_type<scalar_t>;
  UpdateArgs folded = args;
  if (COMBINE) folded.grad_mul = 1.0;  // the gradient is unscaled before it is combined
  const auto u = update_scalars<acc_t>(folded);
  const acc_t gm = acc_t(args.grad_mul);
  const acc_t c0 = COMBINE ? acc_t(args.coef[0]) : acc_t(1), c1 = COMBINE ? acc_t(args.coef[1]) : acc_t(0);
  const acc_t c2 = COMBINE ? acc_t(args.coef[2]) : acc_t(0), c3 = COMBINE ? acc_t(args.coef[3]) : acc_t(0);
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      const Chunk& ch = chunks[c];
      scalar_t* w = ptr<scalar_t>(params, ch.tensor);
      const scalar_t* src = ptr<scalar_t>(sources, ch.tensor);
      if (OPT == kOptRestore) {
        if (w != src) std::memcpy(w + ch.begin, src + ch.begin, (ch.end - ch.begin) * sizeof(scalar_t));
        continue;
      }
      const scalar_t* __restrict__ g = ptr<scalar_t>(grads, ch.tensor);
      scalar_t* __restrict__ s1 = ptr<scalar_t>(state1, ch.tensor);
      scalar_t* __restrict__ s2 = ptr<scalar_t>(state2, ch.tensor);
      scalar_t* __restrict__ ax = ptr<scalar_t>(aux, ch.tensor);
      // A local copy: stores through the tensor pointers cannot alias it, so it stays in registers
      // and the loop vectorizes (with the shared reference it ran at ~half the bandwidth).
      const UpdateScalars<acc_t> lu = u;
      for (int64_t i = ch.begin; i < ch.end; ++i) {
        acc_t gx = acc_t(g[i]);
        if (COMBINE) {
          const acc_t x = gx * gm, a = acc_t(ax[i]);
          gx = c0 * x + c1 * a;
          if (COMBINE == 2) ax[i] = scalar_t(c2 * x + c3 * a);
        }
        if (OPT == kOptSgd) {
          acc_t m = HAS_MOMENTUM ? acc_t(s1[i]) : acc_t(0);
          const acc_t out = sgd_element<acc_t, HAS_MOMENTUM, NESTEROV>(lu, acc_t(src[i]), gx, m);
          if (HAS_MOMENTUM) s1[i] = scalar_t(m);
          w[i] = scalar_t(out);
        } else {
          acc_t m = acc_t(s1[i]), v = acc_t(s2[i]);
          const acc_t out = adam_element<acc_t>(lu, acc_t(src[i]), gx, m, v);
          s1[i] = scalar_t(m);
          s2[i] = scalar_t(v);
          w[i] = scalar_t(out);
        }
      }
    }
  });
}

}  // namespace

void restore_update_cpu(const TensorList& params, const TensorList& grads, const TensorList& sources,
                        const TensorList& state1, const TensorList& state2, const TensorList& aux,
                        const UpdateArgs& args) {
  const auto chunks = make_chunks(params);
  if (chunks.empty()) return;
  UpdateArgs u = args;
  if (u.found_inf != nullptr && *u.found_inf != 0.0f) u.opt = kOptRestore;  // AMP: skip, only restore
  u.grad_mul = u.inv_scale != nullptr ? static_cast<double>(*u.inv_scale) : 1.0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, params[0].scalar_type(), "restore_update_cpu", [&] {
    const auto with = [&](auto opt, auto has_momentum, auto nesterov, auto combine) {
      update_chunks<scalar_t, decltype(opt)::value, decltype(has_momentum)::value, decltype(nesterov)::value,
                    decltype(combine)::value>(chunks, params, grads, sources, state1, state2, aux, u);
    };
    const auto run = [&](auto opt, auto has_momentum, auto nesterov) {
      if (u.combine == 1) return with(opt, has_momentum, nesterov, std::integral_constant<int, 1>());
      if (u.combine == 2) return with(opt, has_momentum, nesterov, std::integral_constant<int, 2>());
      return with(opt, has_momentum, nesterov, std::integral_constant<int, 0>());
    };
    using F = std::false_type;
    using T = std::true_type;
    if (u.opt == kOptRestore) return with(std::integral_constant<int64_t, kOptRestore>(), F(), F(), std::integral_constant<int, 0>());
    if (u.opt == kOptAdam) return run(std::integral_constant<int64_t, kOptAdam>(), F(), F());
    const auto sgd = std::integral_constant<int64_t, kOptSgd>();
    if (!u.has_momentum) return run(sgd, F(), F());
    return u.nesterov ? run(sgd, T(), T()) : run(sgd, T(), F());
  });
}

namespace {

template <typename scalar_t, bool ADAM, bool RESTORE>
void msam_update_chunks(const std::vector<Chunk>& chunks, const TensorList& params, const TensorList& grads,
                        const TensorList& ms, const TensorList& vs, const UpdateArgs& args, double rho, float inv,
                        std::vector<double>& partial) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto u = update_scalars<acc_t>(args);
  const acc_t r = acc_t(static_cast<acc_t>(rho) * acc_t(inv));
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      const Chunk& ch = chunks[c];
      scalar_t* __restrict__ w = ptr<scalar_t>(params, ch.tensor);
      const scalar_t* __restrict__ g = ptr<scalar_t>(grads, ch.tensor);
      scalar_t* __restrict__ m = ptr<scalar_t>(ms, ch.tensor);
      scalar_t* __restrict__ v = ADAM ? ptr<scalar_t>(vs, ch.tensor) : nullptr;
      const UpdateScalars<acc_t> lu = u;  // a local copy: stays in registers (see update_chunks)
      double lanes[kLanes] = {};
      const auto element = [&](int64_t i, int k) {
        acc_t mi = acc_t(m[i]), vi = ADAM ? acc_t(v[i]) : acc_t(0);
        const acc_t out = msam_element<acc_t, ADAM, RESTORE>(lu, acc_t(w[i]), acc_t(g[i]), r, mi, vi);
        const scalar_t stored = scalar_t(mi);
        m[i] = stored;
        if (ADAM) v[i] = scalar_t(vi);
        w[i] = scalar_t(out);
        lanes[k] += double(stored) * double(stored);
      };
      int64_t i = ch.begin;
      for (; i + kLanes <= ch.end; i += kLanes)
        for (int k = 0; k < kLanes; ++k) element(i + k, k);
      for (; i < ch.end; ++i) element(i, 0);
      double total = 0;
      for (int k = 0; k < kLanes; ++k) total += lanes[k];
      partial[c] = total;
    }
  });
}

}  // namespace

void msam_update_cpu(at::Tensor& out, const TensorList& params, const TensorList& grads, const TensorList& m,
                     const TensorList& v, const UpdateArgs& args, bool restore, double rho, const at::Tensor& inv,
                     bool accumulate) {
  if (args.found_inf != nullptr && *args.found_inf != 0.0f) return;  // AMP: nothing written
  UpdateArgs u = args;
  u.grad_mul = u.inv_scale != nullptr ? static_cast<double>(*u.inv_scale) : 1.0;
  const auto chunks = make_chunks(params);
  std::vector<double> partial(chunks.size(), 0.0);
  const float inv_v = *inv.data_ptr<float>();
  if (!chunks.empty()) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, params[0].scalar_type(), "msam_update_cpu", [&] {
      const bool adam = u.opt == kOptAdam;
      if (adam && restore) msam_update_chunks<scalar_t, true, true>(chunks, params, grads, m, v, u, rho, inv_v, partial);
      if (adam && !restore) msam_update_chunks<scalar_t, true, false>(chunks, params, grads, m, v, u, rho, inv_v, partial);
      if (!adam && restore) msam_update_chunks<scalar_t, false, true>(chunks, params, grads, m, v, u, rho, inv_v, partial);
      if (!adam && !restore) msam_update_chunks<scalar_t, false, false>(chunks, params, grads, m, v, u, rho, inv_v, partial);
    });
  }
  double total = 0.0;  // fixed order
  for (double x : partial) total += x;
  double* dst = out.data_ptr<double>();
  *dst = accumulate ? *dst + total : total;
}

void msam_perturb_cpu(const TensorList& params, const TensorList& m, double rho, const at::Tensor& inv_next,
                      const float* found_inf) {
  if (found_inf != nullptr && *found_inf != 0.0f) return;
  const auto chunks = make_chunks(params);
  if (chunks.empty()) return;
  const float inv_v = *inv_next.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, params[0].scalar_type(), "msam_perturb_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t r = acc_t(static_cast<acc_t>(rho) * acc_t(inv_v));
    at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t cb, int64_t ce) {
      for (int64_t c = cb; c < ce; ++c) {
        const Chunk& ch = chunks[c];
        scalar_t* __restrict__ w = ptr<scalar_t>(params, ch.tensor);
        const scalar_t* __restrict__ mm = ptr<scalar_t>(m, ch.tensor);
        for (int64_t i = ch.begin; i < ch.end; ++i) w[i] = scalar_t(acc_t(w[i]) - r * acc_t(mm[i]));
      }
    });
  });
}

}  // namespace sam_fused
