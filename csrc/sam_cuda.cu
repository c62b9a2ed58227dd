// CUDA kernels of the three fused passes, on multi_tensor_apply. Tensor-list slots:
//   sq_sum:          tl[0] params, tl[1] grads                       -> one partial per block
//   perturb_:        tl[0] params, tl[1] grads, tl[2] backups
//   restore_update_: tl[0] params, tl[1] grads, tl[2] sources, tl[3] state1, tl[4] state2
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

template <typename scalar_t>
struct SqSumFunctor {
  __device__ void operator()(MetaTable<2>& meta, float* partials, bool adaptive, float eta, const float* inv_scale) {
    using acc_t = at::opmath_type<scalar_t>;
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
    if (threadIdx.x == 0) partials[meta.first_block + blockIdx.x] = static_cast<float>(acc);
  }
};

__global__ void __launch_bounds__(kThreads) final_sum_kernel(const float* partials, int64_t n, float* out,
                                                            bool accumulate) {
  float acc = 0.f;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) acc += partials[i];
  acc = block_sum<float>(acc);
  if (threadIdx.x == 0) *out = accumulate ? *out + acc : acc;
}

template <typename scalar_t>
struct PerturbFunctor {
  __device__ void operator()(MetaTable<3>& meta, const float* norm, float rho, bool adaptive, float eta,
                             const float* inv_scale) {
    using acc_t = at::opmath_type<scalar_t>;
    const auto [t, begin, end] = chunk_range(meta);
    scalar_t* w = slot<scalar_t>(meta.addresses[0][t]);
    const scalar_t* g = slot<scalar_t>(meta.addresses[1][t]);
    scalar_t* b = slot<scalar_t>(meta.addresses[2][t]);
    bool ok;
    const acc_t scale = perturb_scale<acc_t>(*norm, rho, inv_scale == nullptr ? 1.f : *inv_scale, &ok);
    const bool vec = vec_aligned(w) && vec_aligned(g) && vec_aligned(b);
    scalar_t wv[kVec], gv[kVec];
    for (int64_t i = begin + kVec * threadIdx.x; i < end; i += kVec * blockDim.x) {
      load_vec(w, i, end, vec, wv);
      store_vec(b, i, end, vec, wv);
      if (!ok) continue;  // non-finite norm: the weights stay as they are
      load_vec(g, i, end, vec, gv);
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        const acc_t x = acc_t(wv[j]);
        wv[j] = scalar_t(x + perturbation<acc_t>(x, acc_t(gv[j]), scale, adaptive, acc_t(eta)));
      }
      store_vec(w, i, end, vec, wv);
    }
  }
};

template <typename scalar_t, int64_t OPT, bool HAS_MOMENTUM, bool NESTEROV>
struct UpdateFunctor {
  __device__ void operator()(MetaTable<5>& meta, UpdateScalars<at::opmath_type<scalar_t>> u, const float* inv_scale,
                             const float* found_inf) {
    using acc_t = at::opmath_type<scalar_t>;
    bool skip = false;  // AMP: an inf/NaN was found, the pass only restores
    if (inv_scale != nullptr) {
      u.sign *= acc_t(*inv_scale);
      skip = *found_inf != 0.f;
    }
    const auto [t, begin, end] = chunk_range(meta);
    scalar_t* w = slot<scalar_t>(meta.addresses[0][t]);
    const scalar_t* g = slot<scalar_t>(meta.addresses[1][t]);
    const scalar_t* src = slot<scalar_t>(meta.addresses[2][t]);
    scalar_t* s1 = slot<scalar_t>(meta.addresses[3][t]);
    scalar_t* s2 = slot<scalar_t>(meta.addresses[4][t]);
    constexpr bool kMomentum = OPT == kOptAdam || (OPT == kOptSgd && HAS_MOMENTUM);
    const bool vec = vec_aligned(w) && vec_aligned(g) && vec_aligned(src) && vec_aligned(s1) && vec_aligned(s2);
    scalar_t wv[kVec], gv[kVec], mv[kVec], vv[kVec];
    for (int64_t i = begin + kVec * threadIdx.x; i < end; i += kVec * blockDim.x) {
      load_vec(src, i, end, vec, wv);
      if (OPT != kOptRestore && !skip) {
        load_vec(g, i, end, vec, gv);
        if (kMomentum) load_vec(s1, i, end, vec, mv);
        if (OPT == kOptAdam) load_vec(s2, i, end, vec, vv);
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
          acc_t m = kMomentum ? acc_t(mv[j]) : acc_t(0);
          acc_t out;
          if (OPT == kOptSgd) {
            out = sgd_element<acc_t, HAS_MOMENTUM, NESTEROV>(u, acc_t(wv[j]), acc_t(gv[j]), m);
          } else {
            acc_t v = acc_t(vv[j]);
            out = adam_element<acc_t>(u, acc_t(wv[j]), acc_t(gv[j]), m, v);
            vv[j] = scalar_t(v);
          }
          mv[j] = scalar_t(m);
          wv[j] = scalar_t(out);
        }
        if (kMomentum) store_vec(s1, i, end, vec, mv);
        if (OPT == kOptAdam) store_vec(s2, i, end, vec, vv);
      }
      store_vec(w, i, end, vec, wv);
    }
  }
};

}  // namespace

void sq_sum_cuda(at::Tensor& out, const TensorList& params, const TensorList& grads, bool adaptive, double eta,
                 bool accumulate, const at::Tensor* inv_scale) {
  const auto opts = params[0].options().dtype(at::kFloat);
  auto partials = at::empty({std::max<int64_t>(total_chunks(params), 1)}, opts);
  const int64_t n = total_chunks(params);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, params[0].scalar_type(), "sq_sum_cuda", [&] {
    multi_tensor_apply<2>({&params, &grads}, SqSumFunctor<scalar_t>(), partials.data_ptr<float>(), adaptive,
                          static_cast<float>(eta), inv_scale == nullptr ? nullptr : inv_scale->data_ptr<float>());
  });
  const c10::cuda::CUDAGuard guard(params[0].device());
  final_sum_kernel<<<1, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(partials.data_ptr<float>(), n,
                                                                        out.data_ptr<float>(), accumulate);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void perturb_cuda(const TensorList& params, const TensorList& grads, const TensorList& backups,
                  const at::Tensor& norm, double rho, bool adaptive, double eta, const at::Tensor* inv_scale) {
  TORCH_CHECK(norm.is_cuda() && norm.scalar_type() == at::kFloat && norm.numel() == 1,
              "perturb_: norm must be a one-element float32 CUDA tensor");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, params[0].scalar_type(), "perturb_cuda", [&] {
    multi_tensor_apply<3>({&params, &grads, &backups}, PerturbFunctor<scalar_t>(), norm.data_ptr<float>(),
                          static_cast<float>(rho), adaptive, static_cast<float>(eta),
                          inv_scale == nullptr ? nullptr : inv_scale->data_ptr<float>());
  });
}

void restore_update_cuda(const TensorList& params, const TensorList& grads, const TensorList& sources,
                         const TensorList& state1, const TensorList& state2, const UpdateArgs& args) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, params[0].scalar_type(), "restore_update_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto u = update_scalars<acc_t>(args);
    const std::vector<const TensorList*> lists{&params, &grads, &sources, &state1, &state2};
    if (args.opt == kOptRestore) {
      multi_tensor_apply<5>(lists, UpdateFunctor<scalar_t, kOptRestore, false, false>(), u, args.inv_scale, args.found_inf);
    } else if (args.opt == kOptAdam) {
      multi_tensor_apply<5>(lists, UpdateFunctor<scalar_t, kOptAdam, false, false>(), u, args.inv_scale, args.found_inf);
    } else if (!args.has_momentum) {
      multi_tensor_apply<5>(lists, UpdateFunctor<scalar_t, kOptSgd, false, false>(), u, args.inv_scale, args.found_inf);
    } else if (args.nesterov) {
      multi_tensor_apply<5>(lists, UpdateFunctor<scalar_t, kOptSgd, true, true>(), u, args.inv_scale, args.found_inf);
    } else {
      multi_tensor_apply<5>(lists, UpdateFunctor<scalar_t, kOptSgd, true, false>(), u, args.inv_scale, args.found_inf);
    }
  });
}

}  // namespace sam_fused
