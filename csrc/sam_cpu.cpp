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

template <typename scalar_t, bool ADAPTIVE>
void sq_sum_chunks(const std::vector<Chunk>& chunks, const TensorList& params, const TensorList& grads, double eta,
                   float grad_mul, std::vector<double>& partial) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t m = acc_t(grad_mul);
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      const Chunk& ch = chunks[c];
      const scalar_t* g = ptr<scalar_t>(grads, ch.tensor);
      const scalar_t* w = ptr<scalar_t>(params, ch.tensor);
      acc_t lanes[kLanes] = {};
      int64_t i = ch.begin;
      for (; i + kLanes <= ch.end; i += kLanes) {
        for (int k = 0; k < kLanes; ++k)
          lanes[k] += weighted_square<acc_t>(acc_t(w[i + k]), acc_t(g[i + k]) * m, ADAPTIVE, acc_t(eta));
      }
      for (; i < ch.end; ++i) lanes[0] += weighted_square<acc_t>(acc_t(w[i]), acc_t(g[i]) * m, ADAPTIVE, acc_t(eta));
      acc_t s = 0;
      for (int k = 0; k < kLanes; ++k) s += lanes[k];
      partial[c] = static_cast<double>(s);
    }
  });
}

template <typename scalar_t, bool ADAPTIVE>
void perturb_chunks(const std::vector<Chunk>& chunks, const TensorList& params, const TensorList& grads,
                    const TensorList& backups, float norm, double rho, double eta, float grad_mul) {
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
      if (!ok) continue;  // non-finite norm: the weights stay as they are
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
                bool accumulate, const at::Tensor* inv_scale) {
  const float grad_mul = grad_mul_of(inv_scale);
  const auto chunks = make_chunks(params);
  std::vector<double> partial(chunks.size(), 0.0);
  if (!chunks.empty()) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, params[0].scalar_type(), "sq_sum_cpu", [&] {
      if (adaptive) {
        sq_sum_chunks<scalar_t, true>(chunks, params, grads, eta, grad_mul, partial);
      } else {
        sq_sum_chunks<scalar_t, false>(chunks, params, grads, eta, grad_mul, partial);
      }
    });
  }
  double total = 0.0;  // fixed order: the same gradients give the same bits, whatever the threads
  for (double v : partial) total += v;
  float* dst = out.data_ptr<float>();
  *dst = accumulate ? static_cast<float>(static_cast<double>(*dst) + total) : static_cast<float>(total);
}

void perturb_cpu(const TensorList& params, const TensorList& grads, const TensorList& backups,
                 const at::Tensor& norm, double rho, bool adaptive, double eta, const at::Tensor* inv_scale) {
  const float grad_mul = grad_mul_of(inv_scale);
  const float norm_v = norm.to(at::kFloat).item<float>();  // a CPU tensor: no device synchronization
  const auto chunks = make_chunks(params);
  if (chunks.empty()) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, params[0].scalar_type(), "perturb_cpu", [&] {
    if (adaptive) {
      perturb_chunks<scalar_t, true>(chunks, params, grads, backups, norm_v, rho, eta, grad_mul);
    } else {
      perturb_chunks<scalar_t, false>(chunks, params, grads, backups, norm_v, rho, eta, grad_mul);
    }
  });
}

namespace {

// OPT: kOptRestore, kOptSgd or kOptAdam; the SGD switches are template arguments too, so that
// each loop body is straight-line code the compiler vectorizes.
template <typename scalar_t, int64_t OPT, bool HAS_MOMENTUM, bool NESTEROV>
void update_chunks(const std::vector<Chunk>& chunks, const TensorList& params, const TensorList& grads,
                   const TensorList& sources, const TensorList& state1, const TensorList& state2,
                   const UpdateArgs& args) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto u = update_scalars<acc_t>(args);
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
      // A local copy: stores through the tensor pointers cannot alias it, so it stays in registers
      // and the loop vectorizes (with the shared reference it ran at ~half the bandwidth).
      const UpdateScalars<acc_t> lu = u;
      for (int64_t i = ch.begin; i < ch.end; ++i) {
        if (OPT == kOptSgd) {
          acc_t m = HAS_MOMENTUM ? acc_t(s1[i]) : acc_t(0);
          const acc_t out = sgd_element<acc_t, HAS_MOMENTUM, NESTEROV>(lu, acc_t(src[i]), acc_t(g[i]), m);
          if (HAS_MOMENTUM) s1[i] = scalar_t(m);
          w[i] = scalar_t(out);
        } else {
          acc_t m = acc_t(s1[i]), v = acc_t(s2[i]);
          const acc_t out = adam_element<acc_t>(lu, acc_t(src[i]), acc_t(g[i]), m, v);
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
                        const TensorList& state1, const TensorList& state2, const UpdateArgs& args) {
  const auto chunks = make_chunks(params);
  if (chunks.empty()) return;
  UpdateArgs u = args;
  if (u.found_inf != nullptr && *u.found_inf != 0.0f) u.opt = kOptRestore;  // AMP: skip, only restore
  u.grad_mul = u.inv_scale != nullptr ? static_cast<double>(*u.inv_scale) : 1.0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, params[0].scalar_type(), "restore_update_cpu", [&] {
    const auto run = [&](auto opt, auto has_momentum, auto nesterov) {
      update_chunks<scalar_t, decltype(opt)::value, decltype(has_momentum)::value, decltype(nesterov)::value>(
          chunks, params, grads, sources, state1, state2, u);
    };
    using F = std::false_type;
    using T = std::true_type;
    if (u.opt == kOptRestore) return run(std::integral_constant<int64_t, kOptRestore>(), F(), F());
    if (u.opt == kOptAdam) return run(std::integral_constant<int64_t, kOptAdam>(), F(), F());
    const auto sgd = std::integral_constant<int64_t, kOptSgd>();
    if (!u.has_momentum) return run(sgd, F(), F());
    return u.nesterov ? run(sgd, T(), T()) : run(sgd, T(), F());
  });
}

}  // namespace sam_fused
