// CUDA kernels of the three fused passes, on multi_tensor_apply. Tensor-list slots:
//   sq_sum:          tl[0] params, tl[1] grads                       -> one fp64 partial per block
//                    (preconditioned: tl[2] Adam's exp_avg_sq)
//   dots_:           tl[0] grads, tl[1] aux                          -> three partials per block
//   perturb_:        tl[0] params, tl[1] grads, tl[2] backups, tl[3] save (GSAM/LookSAM, may be empty)
//                    (preconditioned: tl[3] Adam's exp_avg_sq; nothing is saved)
//   restore_update_: tl[0] params, tl[1] grads, tl[2] sources, tl[3] state1, tl[4] state2, tl[5] aux
// The norm never leaves the device: sq_sum writes partials, a one-block kernel sums them in a
// fixed order, and perturb_ reads the result through a pointer.
#include <ATen/OpMathType.h>

#include <cstdint>
#include <c10/cuda/CUDAStream.h>

#include "multi_tensor_apply.cuh"
#include "sam_fused.h"
#include "sam_math.h"

namespace sam_fused {
namespace {

template <typename T>
__device__ T* slot(void* p) {
  return static_cast<T*>(p);
}

// Each thread handles kVec consecutive elements per iteration: one 16-byte load per array for fp32
// (8 bytes for bf16/fp16) when every pointer of the block is aligned to kVec elements (a chunk
// starts at a multiple of 65536 elements, so the base pointers decide), else element by element.
constexpr int kVec = 4;

template <typename T>
struct alignas(sizeof(T) * kVec) Pack {
  T v[kVec];
};

template <typename T>
__device__ __forceinline__ bool vec_aligned(const T* p) {
  return p == nullptr || reinterpret_cast<uintptr_t>(p) % (sizeof(T) * kVec) == 0;
}

// out[j] = p[i + j], zero past end.
template <typename T>
__device__ __forceinline__ void load_vec(const T* p, int64_t i, int64_t end, bool vec, T (&out)[kVec]) {
  if (vec && i + kVec <= end) {
    const Pack<T> pk = *reinterpret_cast<const Pack<T>*>(p + i);
#pragma unroll
    for (int j = 0; j < kVec; ++j) out[j] = pk.v[j];
  } else {
#pragma unroll
    for (int j = 0; j < kVec; ++j) out[j] = i + j < end ? p[i + j] : T(0);
  }
}

// p[i + j] = in[j] for the elements before end.
template <typename T>
__device__ __forceinline__ void store_vec(T* p, int64_t i, int64_t end, bool vec, const T (&in)[kVec]) {
  if (vec && i + kVec <= end) {
    Pack<T> pk;
#pragma unroll
    for (int j = 0; j < kVec; ++j) pk.v[j] = in[j];
    *reinterpret_cast<Pack<T>*>(p + i) = pk;
  } else {
#pragma unroll
    for (int j = 0; j < kVec; ++j)
      if (i + j < end) p[i + j] = in[j];
  }
}

// Sum of a per-thread value over the block, in a fixed order (deterministic).
template <typename acc_t>
__device__ acc_t block_sum(acc_t v) {
  __shared__ acc_t buf[kThreads];
  buf[threadIdx.x] = v;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) buf[threadIdx.x] += buf[threadIdx.x + s];
    __syncthreads();
  }
  return buf[0];
}

// Products and sums in double: finite whenever the norm fits fp32 (see sam_fused/kernels/norm.py).
template <typename scalar_t>
struct SqSumFunctor {
  __device__ void operator()(MetaTable<2>& meta, double* partials, bool adaptive, double eta, const float* inv_scale) {
    using acc_t = double;
    const acc_t m = inv_scale == nullptr ? acc_t(1) : acc_t(*inv_scale);
    const auto [t, begin, end] = chunk_range(meta);
    const scalar_t* w = slot<scalar_t>(meta.addresses[0][t]);
    const scalar_t* g = slot<scalar_t>(meta.addresses[1][t]);
    const bool vec = vec_aligned(w) && vec_aligned(g);
    acc_t acc = 0;
    scalar_t wv[kVec], gv[kVec];
    for (int64_t i = begin + kVec * threadIdx.x; i < end; i += kVec * blockDim.x) {
      load_vec(g, i, end, vec, gv);
      if (adaptive) load_vec(w, i, end, vec, wv);  // SAM reads only g
#pragma unroll
      for (int j = 0; j < kVec; ++j)
        acc += weighted_square<acc_t>(adaptive ? acc_t(wv[j]) : acc_t(0), acc_t(gv[j]) * m, adaptive, acc_t(eta));
    }
    acc = block_sum<acc_t>(acc);
    if (threadIdx.x == 0) partials[meta.first_block + blockIdx.x] = acc;
  }
};

// The preconditioned norm's partials: sum (g / P)^2 per block, P = sqrt(v) * bc2_inv + eps (sam_math.h,
// inverse_adam_denominator): 1 / P in the element's math type, products and sums in double, as the
// CPU kernel computes them.
template <typename scalar_t>
struct SqSumPrecondFunctor {
  __device__ void operator()(MetaTable<3>& meta, double* partials, float eps, float bc2_inv, const float* inv_scale) {
    using acc_t = at::opmath_type<scalar_t>;
    const double m = inv_scale == nullptr ? 1.0 : double(*inv_scale);
    const auto [t, begin, end] = chunk_range(meta);
    const scalar_t* g = slot<scalar_t>(meta.addresses[1][t]);
    const scalar_t* v = slot<scalar_t>(meta.addresses[2][t]);
    const bool vec = vec_aligned(g) && vec_aligned(v);
    double acc = 0;
    scalar_t gv[kVec], vv[kVec];
    for (int64_t i = begin + kVec * threadIdx.x; i < end; i += kVec * blockDim.x) {
      load_vec(g, i, end, vec, gv);
      load_vec(v, i, end, vec, vv);  // zeros past the end: 1 / eps times a zero gradient
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        const double x =
            double(gv[j]) * m * double(inverse_adam_denominator<acc_t>(acc_t(vv[j]), acc_t(bc2_inv), acc_t(eps)));
        acc += x * x;
      }
    }
    acc = block_sum<double>(acc);
    if (threadIdx.x == 0) partials[meta.first_block + blockIdx.x] = acc;
  }
};

// Per block: sum g^2, sum g * aux, sum aux^2 (g times AMP's inv_scale), into partials[3 * block + k].
template <typename scalar_t>
struct DotsFunctor {
  __device__ void operator()(MetaTable<2>& meta, float* partials, const float* inv_scale) {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t m = inv_scale == nullptr ? acc_t(1) : acc_t(*inv_scale);
    const auto [t, begin, end] = chunk_range(meta);
    const scalar_t* g = slot<scalar_t>(meta.addresses[0][t]);
    const scalar_t* a = slot<scalar_t>(meta.addresses[1][t]);
    const bool vec = vec_aligned(g) && vec_aligned(a);
    acc_t gg = 0, ga = 0, aa = 0;
    scalar_t gv[kVec], av[kVec];
    for (int64_t i = begin + kVec * threadIdx.x; i < end; i += kVec * blockDim.x) {
      load_vec(g, i, end, vec, gv);
      load_vec(a, i, end, vec, av);
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        const acc_t x = acc_t(gv[j]) * m, y = acc_t(av[j]);
        gg += x * x;
        ga += x * y;
        aa += y * y;
      }
    }
    gg = block_sum<acc_t>(gg);
    ga = block_sum<acc_t>(ga);
    aa = block_sum<acc_t>(aa);
    if (threadIdx.x == 0) {
      const int64_t b = 3 * (meta.first_block + blockIdx.x);
      partials[b] = static_cast<float>(gg);
      partials[b + 1] = static_cast<float>(ga);
      partials[b + 2] = static_cast<float>(aa);
    }
  }
};

// out[k] (+)= sum of partials[stride * i + k] over i < n, for k < width, in a fixed order.
__global__ void __launch_bounds__(kThreads) final_sums_kernel(const float* partials, int64_t n, int width,
                                                             float* out, bool accumulate) {
  for (int k = 0; k < width; ++k) {
    float acc = 0.f;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) acc += partials[width * i + k];
    acc = block_sum<float>(acc);
    if (threadIdx.x == 0) out[k] = accumulate ? out[k] + acc : acc;
    __syncthreads();  // block_sum's shared buffer is reused by the next k
  }
}

__global__ void __launch_bounds__(kThreads) final_sum_kernel(const double* partials, int64_t n, double* out,
                                                            bool accumulate) {
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) acc += partials[i];
  acc = block_sum<double>(acc);
  if (threadIdx.x == 0) *out = accumulate ? *out + acc : acc;
}

template <typename scalar_t>
struct PerturbFunctor {
  __device__ void operator()(MetaTable<4>& meta, const float* norm, float rho, bool adaptive, float eta,
                             const float* inv_scale) {
    using acc_t = at::opmath_type<scalar_t>;
    const auto [t, begin, end] = chunk_range(meta);
    scalar_t* w = slot<scalar_t>(meta.addresses[0][t]);
    const scalar_t* g = slot<scalar_t>(meta.addresses[1][t]);
    scalar_t* b = slot<scalar_t>(meta.addresses[2][t]);
    scalar_t* sv = slot<scalar_t>(meta.addresses[3][t]);  // null unless GSAM / LookSAM keep g
    const float gm = inv_scale == nullptr ? 1.f : *inv_scale;
    bool ok;
    const acc_t scale = perturb_scale<acc_t>(*norm, rho, gm, &ok);
    const bool vec = vec_aligned(w) && vec_aligned(g) && vec_aligned(b) && vec_aligned(sv);
    scalar_t wv[kVec], gv[kVec], svv[kVec];
    for (int64_t i = begin + kVec * threadIdx.x; i < end; i += kVec * blockDim.x) {
      load_vec(w, i, end, vec, wv);
      store_vec(b, i, end, vec, wv);
      if (sv != nullptr && ok) {  // a non-finite first gradient is not saved
        load_vec(g, i, end, vec, gv);
#pragma unroll
        for (int j = 0; j < kVec; ++j) svv[j] = scalar_t(acc_t(gv[j]) * acc_t(gm));
        store_vec(sv, i, end, vec, svv);
      }
      if (!ok) continue;  // non-finite norm: the weights stay as they are
      if (sv == nullptr) load_vec(g, i, end, vec, gv);  // (with sv, loaded above: ok holds here)
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        const acc_t x = acc_t(wv[j]);
        wv[j] = scalar_t(x + perturbation<acc_t>(x, acc_t(gv[j]), scale, adaptive, acc_t(eta)));
      }
      store_vec(w, i, end, vec, wv);
    }
  }
};

// The preconditioned perturbation: backup = w, w += g * scale / P (P as in SqSumPrecondFunctor).
template <typename scalar_t>
struct PerturbPrecondFunctor {
  __device__ void operator()(MetaTable<4>& meta, const float* norm, float rho, float eps, float bc2_inv,
                             const float* inv_scale) {
    using acc_t = at::opmath_type<scalar_t>;
    const auto [t, begin, end] = chunk_range(meta);
    scalar_t* w = slot<scalar_t>(meta.addresses[0][t]);
    const scalar_t* g = slot<scalar_t>(meta.addresses[1][t]);
    scalar_t* b = slot<scalar_t>(meta.addresses[2][t]);
    const scalar_t* v = slot<scalar_t>(meta.addresses[3][t]);
    bool ok;
    const acc_t scale = perturb_scale<acc_t>(*norm, rho, inv_scale == nullptr ? 1.f : *inv_scale, &ok);
    const bool vec = vec_aligned(w) && vec_aligned(g) && vec_aligned(b) && vec_aligned(v);
    scalar_t wv[kVec], gv[kVec], vv[kVec];
    for (int64_t i = begin + kVec * threadIdx.x; i < end; i += kVec * blockDim.x) {
      load_vec(w, i, end, vec, wv);
      store_vec(b, i, end, vec, wv);
      if (!ok) continue;  // non-finite norm: the weights stay as they are
      load_vec(g, i, end, vec, gv);
      load_vec(v, i, end, vec, vv);
#pragma unroll
      for (int j = 0; j < kVec; ++j)
        wv[j] = scalar_t(acc_t(wv[j]) + acc_t(gv[j]) * scale *
                                            inverse_adam_denominator<acc_t>(acc_t(vv[j]), acc_t(bc2_inv), acc_t(eps)));
      store_vec(w, i, end, vec, wv);
    }
  }
};

// COMBINE: 0, or GSAM / LookSAM's g_eff = c0 g + c1 aux (1), also rewriting aux = c2 g + c3 aux (2).
template <typename scalar_t, int64_t OPT, bool HAS_MOMENTUM, bool NESTEROV, int COMBINE>
struct UpdateFunctor {
  __device__ void operator()(MetaTable<6>& meta, UpdateScalars<at::opmath_type<scalar_t>> u, const float* inv_scale,
                             const float* found_inf, const float* coef) {
    using acc_t = at::opmath_type<scalar_t>;
    bool skip = false;  // AMP: an inf/NaN was found, the pass only restores
    acc_t gm = 1;       // the combination reads the gradient unscaled
    if (inv_scale != nullptr) {
      if (COMBINE) {
        gm = acc_t(*inv_scale);
      } else {
        u.sign *= acc_t(*inv_scale);
      }
      skip = *found_inf != 0.f;
    }
    acc_t c0 = 1, c1 = 0, c2 = 0, c3 = 0;
    if (COMBINE) {
      c0 = coef[0];
      c1 = coef[1];
      c2 = coef[2];
      c3 = coef[3];
    }
    const auto [t, begin, end] = chunk_range(meta);
    scalar_t* w = slot<scalar_t>(meta.addresses[0][t]);
    const scalar_t* g = slot<scalar_t>(meta.addresses[1][t]);
    const scalar_t* src = slot<scalar_t>(meta.addresses[2][t]);
    scalar_t* s1 = slot<scalar_t>(meta.addresses[3][t]);
    scalar_t* s2 = slot<scalar_t>(meta.addresses[4][t]);
    scalar_t* ax = slot<scalar_t>(meta.addresses[5][t]);
    constexpr bool kMomentum = OPT == kOptAdam || (OPT == kOptSgd && HAS_MOMENTUM);
    const bool vec = vec_aligned(w) && vec_aligned(g) && vec_aligned(src) && vec_aligned(s1) && vec_aligned(s2) &&
                     vec_aligned(ax);
    scalar_t wv[kVec], gv[kVec], mv[kVec], vv[kVec], av[kVec];
    for (int64_t i = begin + kVec * threadIdx.x; i < end; i += kVec * blockDim.x) {
      load_vec(src, i, end, vec, wv);
      if (OPT != kOptRestore && !skip) {
        load_vec(g, i, end, vec, gv);
        if (COMBINE) load_vec(ax, i, end, vec, av);
        if (kMomentum) load_vec(s1, i, end, vec, mv);
        if (OPT == kOptAdam) load_vec(s2, i, end, vec, vv);
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
          acc_t gx = acc_t(gv[j]);
          if (COMBINE) {
            const acc_t x = gx * gm, a = acc_t(av[j]);
            gx = c0 * x + c1 * a;
            if (COMBINE == 2) av[j] = scalar_t(c2 * x + c3 * a);
          }
          acc_t m = kMomentum ? acc_t(mv[j]) : acc_t(0);
          acc_t out;
          if (OPT == kOptSgd) {
            out = sgd_element<acc_t, HAS_MOMENTUM, NESTEROV>(u, acc_t(wv[j]), gx, m);
          } else {
            acc_t v = acc_t(vv[j]);
            out = adam_element<acc_t>(u, acc_t(wv[j]), gx, m, v);
            vv[j] = scalar_t(v);
          }
          mv[j] = scalar_t(m);
          wv[j] = scalar_t(out);
        }
        if (kMomentum) store_vec(s1, i, end, vec, mv);
        if (OPT == kOptAdam) store_vec(s2, i, end, vec, vv);
        if (COMBINE == 2) store_vec(ax, i, end, vec, av);
      }
      store_vec(w, i, end, vec, wv);
    }
  }
};

// Momentum-SAM's first pass (sam_math.h, msam_element): restore, update, and one fp64 partial of
// the sum of the new m^2 (as stored) per block. AMP: found_inf set, nothing is written.
template <typename scalar_t, bool ADAM, bool RESTORE>
struct MsamUpdateFunctor {
  __device__ void operator()(MetaTable<4>& meta, UpdateScalars<at::opmath_type<scalar_t>> u, float rho,
                             const float* inv, const float* inv_scale, const float* found_inf, double* partials) {
    using acc_t = at::opmath_type<scalar_t>;
    bool skip = false;
    if (inv_scale != nullptr) {
      u.sign *= acc_t(*inv_scale);
      skip = *found_inf != 0.f;
    }
    const acc_t r = acc_t(rho * *inv);
    const auto [t, begin, end] = chunk_range(meta);
    scalar_t* w = slot<scalar_t>(meta.addresses[0][t]);
    const scalar_t* g = slot<scalar_t>(meta.addresses[1][t]);
    scalar_t* ms = slot<scalar_t>(meta.addresses[2][t]);
    scalar_t* vs = slot<scalar_t>(meta.addresses[3][t]);
    const bool vec = vec_aligned(w) && vec_aligned(g) && vec_aligned(ms) && vec_aligned(vs);
    scalar_t wv[kVec], gv[kVec], mv[kVec], vv[kVec];
    double acc = 0;
    for (int64_t i = begin + kVec * threadIdx.x; i < end && !skip; i += kVec * blockDim.x) {
      load_vec(w, i, end, vec, wv);
      load_vec(g, i, end, vec, gv);
      load_vec(ms, i, end, vec, mv);
      if (ADAM) load_vec(vs, i, end, vec, vv);
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        acc_t m = acc_t(mv[j]), v = ADAM ? acc_t(vv[j]) : acc_t(0);
        wv[j] = scalar_t(msam_element<acc_t, ADAM, RESTORE>(u, acc_t(wv[j]), acc_t(gv[j]), r, m, v));
        mv[j] = scalar_t(m);
        if (ADAM) vv[j] = scalar_t(v);
        if (i + j < end) acc += double(mv[j]) * double(mv[j]);
      }
      store_vec(ms, i, end, vec, mv);
      if (ADAM) store_vec(vs, i, end, vec, vv);
      store_vec(w, i, end, vec, wv);
    }
    acc = block_sum<double>(acc);
    if (threadIdx.x == 0) partials[meta.first_block + blockIdx.x] = acc;
  }
};

// Momentum-SAM's second pass: w -= rho * inv_next * m (nothing when AMP found an inf).
template <typename scalar_t>
struct MsamPerturbFunctor {
  __device__ void operator()(MetaTable<2>& meta, float rho, const float* inv_next, const float* found_inf) {
    using acc_t = at::opmath_type<scalar_t>;
    if (found_inf != nullptr && *found_inf != 0.f) return;
    const acc_t r = acc_t(rho * *inv_next);
    const auto [t, begin, end] = chunk_range(meta);
    scalar_t* w = slot<scalar_t>(meta.addresses[0][t]);
    const scalar_t* ms = slot<scalar_t>(meta.addresses[1][t]);
    const bool vec = vec_aligned(w) && vec_aligned(ms);
    scalar_t wv[kVec], mv[kVec];
    for (int64_t i = begin + kVec * threadIdx.x; i < end; i += kVec * blockDim.x) {
      load_vec(w, i, end, vec, wv);
      load_vec(ms, i, end, vec, mv);
#pragma unroll
      for (int j = 0; j < kVec; ++j) wv[j] = scalar_t(acc_t(wv[j]) - r * acc_t(mv[j]));
      store_vec(w, i, end, vec, wv);
    }
  }
};

}  // namespace

namespace {

// The caller's scratch when it is large enough (a step then allocates nothing), else a new one.
at::Tensor scratch(const at::Tensor* partials, int64_t n, const at::Tensor& like, at::ScalarType dtype) {
  if (partials != nullptr && partials->numel() >= n) return *partials;
  return at::empty({std::max<int64_t>(n, 1)}, like.options().dtype(dtype));
}

}  // namespace

void sq_sum_cuda(at::Tensor& out, const TensorList& params, const TensorList& grads, bool adaptive, double eta,
                 bool accumulate, const at::Tensor* inv_scale, const at::Tensor* scratch_in, const TensorList& precond,
                 double bc2_inv) {
  const int64_t n = total_chunks(params);
  auto partials = scratch(scratch_in, n, params[0], at::kDouble);
  const float* inv = inv_scale == nullptr ? nullptr : inv_scale->data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, params[0].scalar_type(), "sq_sum_cuda", [&] {
    if (!precond.empty()) {  // eta carries Adam's eps
      multi_tensor_apply<3>({&params, &grads, &precond}, SqSumPrecondFunctor<scalar_t>(), partials.data_ptr<double>(),
                            static_cast<float>(eta), static_cast<float>(bc2_inv), inv);
    } else {
      multi_tensor_apply<2>({&params, &grads}, SqSumFunctor<scalar_t>(), partials.data_ptr<double>(), adaptive, eta,
                            inv);
    }
  });
  const c10::cuda::CUDAGuard guard(params[0].device());
  final_sum_kernel<<<1, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(partials.data_ptr<double>(), n,
                                                                        out.data_ptr<double>(), accumulate);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void dots_cuda(at::Tensor& out, const TensorList& grads, const TensorList& aux, bool accumulate,
               const at::Tensor* inv_scale, const at::Tensor* scratch_in) {
  const int64_t n = total_chunks(grads);
  auto partials = scratch(scratch_in, 3 * n, grads[0], at::kFloat);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grads[0].scalar_type(), "dots_cuda", [&] {
    multi_tensor_apply<2>({&grads, &aux}, DotsFunctor<scalar_t>(), partials.data_ptr<float>(),
                          inv_scale == nullptr ? nullptr : inv_scale->data_ptr<float>());
  });
  const c10::cuda::CUDAGuard guard(grads[0].device());
  final_sums_kernel<<<1, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(partials.data_ptr<float>(), n, 3,
                                                                          out.data_ptr<float>(), accumulate);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void perturb_cuda(const TensorList& params, const TensorList& grads, const TensorList& backups,
                  const TensorList& save, const at::Tensor& norm, double rho, bool adaptive, double eta,
                  const at::Tensor* inv_scale, const TensorList& precond, double bc2_inv) {
  TORCH_CHECK(norm.is_cuda() && norm.scalar_type() == at::kFloat && norm.numel() == 1,
              "perturb_: norm must be a one-element float32 CUDA tensor");
  TORCH_CHECK(precond.empty() || save.empty(), "perturb_: the preconditioned perturbation saves no gradient");
  const float* inv = inv_scale == nullptr ? nullptr : inv_scale->data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, params[0].scalar_type(), "perturb_cuda", [&] {
    if (!precond.empty()) {  // eta carries Adam's eps
      multi_tensor_apply<4>({&params, &grads, &backups, &precond}, PerturbPrecondFunctor<scalar_t>(),
                            norm.data_ptr<float>(), static_cast<float>(rho), static_cast<float>(eta),
                            static_cast<float>(bc2_inv), inv);
    } else {
      multi_tensor_apply<4>({&params, &grads, &backups, &save}, PerturbFunctor<scalar_t>(), norm.data_ptr<float>(),
                            static_cast<float>(rho), adaptive, static_cast<float>(eta), inv);
    }
  });
}

void restore_update_cuda(const TensorList& params, const TensorList& grads, const TensorList& sources,
                         const TensorList& state1, const TensorList& state2, const TensorList& aux,
                         const UpdateArgs& args) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, params[0].scalar_type(), "restore_update_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto u = update_scalars<acc_t>(args);
    const std::vector<const TensorList*> lists{&params, &grads, &sources, &state1, &state2, &aux};
    const auto with = [&](auto opt, auto has_momentum, auto nesterov, auto combine) {
      multi_tensor_apply<6>(lists,
                            UpdateFunctor<scalar_t, decltype(opt)::value, decltype(has_momentum)::value,
                                          decltype(nesterov)::value, decltype(combine)::value>(),
                            u, args.inv_scale, args.found_inf, args.coef);
    };
    const auto run = [&](auto opt, auto has_momentum, auto nesterov) {
      if (args.combine == 1) return with(opt, has_momentum, nesterov, std::integral_constant<int, 1>());
      if (args.combine == 2) return with(opt, has_momentum, nesterov, std::integral_constant<int, 2>());
      return with(opt, has_momentum, nesterov, std::integral_constant<int, 0>());
    };
    using F = std::false_type;
    using T = std::true_type;
    if (args.opt == kOptRestore) {
      with(std::integral_constant<int64_t, kOptRestore>(), F(), F(), std::integral_constant<int, 0>());
    } else if (args.opt == kOptAdam) {
      run(std::integral_constant<int64_t, kOptAdam>(), F(), F());
    } else if (!args.has_momentum) {
      run(std::integral_constant<int64_t, kOptSgd>(), F(), F());
    } else if (args.nesterov) {
      run(std::integral_constant<int64_t, kOptSgd>(), T(), T());
    } else {
      run(std::integral_constant<int64_t, kOptSgd>(), T(), F());
    }
  });
}

void msam_update_cuda(at::Tensor& out, const TensorList& params, const TensorList& grads, const TensorList& m,
                      const TensorList& v, const UpdateArgs& args, bool restore, double rho, const at::Tensor& inv,
                      bool accumulate, const at::Tensor* scratch_in) {
  TORCH_CHECK(inv.is_cuda(), "msam_update_: inv must be on the parameters' device");
  const int64_t n = total_chunks(params);
  auto partials = scratch(scratch_in, n, params[0], at::kDouble);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, params[0].scalar_type(), "msam_update_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto u = update_scalars<acc_t>(args);
    const std::vector<const TensorList*> lists{&params, &grads, &m, &v};
    const auto with = [&](auto adam, auto rest) {
      multi_tensor_apply<4>(lists, MsamUpdateFunctor<scalar_t, decltype(adam)::value, decltype(rest)::value>(), u,
                            static_cast<float>(rho), inv.data_ptr<float>(), args.inv_scale, args.found_inf,
                            partials.data_ptr<double>());
    };
    using F = std::false_type;
    using T = std::true_type;
    const bool adam = args.opt == kOptAdam;
    if (adam && restore) with(T(), T());
    if (adam && !restore) with(T(), F());
    if (!adam && restore) with(F(), T());
    if (!adam && !restore) with(F(), F());
  });
  const c10::cuda::CUDAGuard guard(params[0].device());
  // with found_inf set the partials are zeros: out is not used then (inv_next keeps the old inv)
  final_sum_kernel<<<1, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(partials.data_ptr<double>(), n,
                                                                        out.data_ptr<double>(), accumulate);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void msam_perturb_cuda(const TensorList& params, const TensorList& m, double rho, const at::Tensor& inv_next,
                       const float* found_inf) {
  TORCH_CHECK(inv_next.is_cuda(), "msam_perturb_: inv_next must be on the parameters' device");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, params[0].scalar_type(), "msam_perturb_cuda", [&] {
    multi_tensor_apply<2>({&params, &m}, MsamPerturbFunctor<scalar_t>(), static_cast<float>(rho),
                          inv_next.data_ptr<float>(), found_inf);
  });
}

}  // namespace sam_fused
