// Multi-tensor apply: lists of tensors cut into 65536-element chunks, one CUDA block per chunk,
// the chunk table passed by value in the kernel arguments (no host-to-device copy, no sync).
// The design follows NVIDIA apex's csrc/multi_tensor_apply.cuh (BSD-3-Clause), which PyTorch's
// fused optimizers (aten/src/ATen/native/cuda/MultiTensorApply.cuh) also adopted; written anew here.
//
// A launch covers up to kMaxBlocks chunks and MetaTable<DEPTH>::kMaxTensors tensors (the argument
// buffer holds 4 KB); longer lists take several launches, a tensor split across two continuing
// in the next. DEPTH is the number of tensor lists (tl[0] is always the parameters).
#pragma once

#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAException.h>

#include <vector>

#include "sam_fused.h"

namespace sam_fused {

constexpr int kThreads = 512;
constexpr int kMaxBlocks = 320;

template <int DEPTH>
struct MetaTable {
  static constexpr int kMaxTensors = DEPTH <= 1 ? 110 : DEPTH == 2 ? 64 : DEPTH == 3 ? 48 : DEPTH == 4 ? 36 : 30;
  void* addresses[DEPTH][kMaxTensors];
  int64_t sizes[kMaxTensors];
  unsigned char block_to_tensor[kMaxBlocks];
  int block_to_chunk[kMaxBlocks];
  int64_t first_block;  // index of this launch's first block among all blocks of the call
};

// The tensor and the element range [begin, end) of this block's chunk.
struct ChunkRange {
  int tensor;
  int64_t begin, end;
};

template <int DEPTH>
__device__ __forceinline__ ChunkRange chunk_range(const MetaTable<DEPTH>& meta) {
  const int t = meta.block_to_tensor[blockIdx.x];
  const int64_t begin = static_cast<int64_t>(meta.block_to_chunk[blockIdx.x]) * kCudaChunk;
  return {t, begin, begin + kCudaChunk < meta.sizes[t] ? begin + kCudaChunk : meta.sizes[t]};
}

template <int DEPTH, typename Functor, typename... Args>
__global__ void __launch_bounds__(kThreads) multi_tensor_kernel(MetaTable<DEPTH> meta, Functor functor, Args... args) {
  functor(meta, args...);
}

// Total chunks (= blocks) a call over these tensors launches.
inline int64_t total_chunks(const TensorList& params) {
  int64_t n = 0;
  for (const auto& p : params) n += (p.numel() + kCudaChunk - 1) / kCudaChunk;
  return n;
}

// lists[d] is the d-th tensor list; an empty list leaves its addresses null (a slot the functor
// does not touch).
template <int DEPTH, typename Functor, typename... Args>
void multi_tensor_apply(const std::vector<const TensorList*>& lists, Functor functor, Args... args) {
  TORCH_CHECK(lists.size() == DEPTH, "multi_tensor_apply: expected ", DEPTH, " lists");
  const TensorList& params = *lists[0];
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  int64_t last = -1;
  for (int64_t t = 0; t < static_cast<int64_t>(params.size()); ++t)
    if (params[t].numel() > 0) last = t;
  MetaTable<DEPTH> meta;
  meta.first_block = 0;
  int n_tensors = 0, n_blocks = 0;
  for (int64_t t = 0; t <= last; ++t) {
    const int64_t n = params[t].numel();
    if (n == 0) continue;
    for (int d = 0; d < DEPTH; ++d)
      meta.addresses[d][n_tensors] = lists[d]->empty() ? nullptr : (*lists[d])[t].data_ptr();
    meta.sizes[n_tensors] = n;
    ++n_tensors;
    const int64_t chunks = (n + kCudaChunk - 1) / kCudaChunk;
    for (int64_t c = 0; c < chunks; ++c) {
      meta.block_to_tensor[n_blocks] = static_cast<unsigned char>(n_tensors - 1);
      meta.block_to_chunk[n_blocks] = static_cast<int>(c);
      ++n_blocks;
      const bool tensor_done = c == chunks - 1;
      if (n_blocks == kMaxBlocks || (tensor_done && n_tensors == MetaTable<DEPTH>::kMaxTensors) ||
          (tensor_done && t == last)) {
        multi_tensor_kernel<DEPTH><<<n_blocks, kThreads, 0, stream>>>(meta, functor, args...);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        meta.first_block += n_blocks;
        n_blocks = 0;
        if (tensor_done) {
          n_tensors = 0;
        } else {  // the tensor goes on in the next launch, as its entry 0
          for (int d = 0; d < DEPTH; ++d) meta.addresses[d][0] = meta.addresses[d][n_tensors - 1];
          meta.sizes[0] = meta.sizes[n_tensors - 1];
          n_tensors = 1;
        }
      }
    }
  }
}

}  // namespace sam_fused
