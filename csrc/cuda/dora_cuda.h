// Host launchers of the DoRA CUDA kernels (csrc/cuda/dora_kernels.cu). Plain CUDA C++ on raw device
// pointers: no torch header, so nvcc compiles the kernels alone; csrc/cuda_ops.cpp adapts tensors.
//
// "acc" below is the accumulation dtype: double for kFloat64 logits, float otherwise.
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

#include "dora_math.h"

namespace dora {
namespace cuda {

enum class DType : int { kFloat32, kBFloat16, kFloat16, kFloat64 };

// A row pass over logits (N, T, V): token row (n, t) starts at logits + n·stride_n + t·stride_t (in
// elements) and is contiguous over the vocabulary, so views such as logits[:, :-1] are read in place.
// `splits` blocks share each row (row_splits); the gradient has its own row strides.
struct RowShape {
  int64_t N, T, V;
  int64_t stride_n, stride_t;
  int64_t ignore_index;
  int splits;
};

// How many blocks should share a row: more than one only when N·T rows are too few to fill the GPU
// (about four waves of blocks) and the rows are long enough to split. Depends on the current device.
int row_splits(DType dtype, const RowShape& shape);

// Forward row pass: lse (N, T, 2) (each token's RowNormaliser (m, log s), dora_math.h) and S, L (N,) in
// acc; `partial` holds 2·N·T·shape.splits acc values.
// A label outside [0, V) that is not ignore_index (unchecked input) gives NaN for its row's lse and S.
cudaError_t seq_logprobs_fwd(DType dtype, const void* logits, const int64_t* labels, RowShape shape, void* lse,
                             void* partial, void* S, void* L, cudaStream_t stream);

// Backward row pass: grad = gS[n]·(onehot(y) − softmax(z)), zero rows at ignored tokens, NaN rows at labels
// outside [0, V); grad has row strides grad_stride_n, grad_stride_t and may be the logits themselves.
cudaError_t seq_logprobs_bwd(DType dtype, const void* logits, void* grad, int64_t grad_stride_n,
                             int64_t grad_stride_t, const int64_t* labels, const void* lse, const void* gS,
                             RowShape shape, cudaStream_t stream);

// x *= *factor over `count` acc values (float, or double as `fp64` says), skipped on the device when
// *factor == 1, so a rescale that is usually not needed costs no pass over x and no host synchronisation.
cudaError_t rescale(bool fp64, void* x, int64_t count, const void* factor, cudaStream_t stream);

// The per-batch stage (csrc/include/dora_math.h) in one thread block. Tensors are acc (float or double)
// as `fp64` says; S_ref and h may be null.
struct StageArgs {
  int loss_code;
  LossParams params;
  int strategy_code;
  double lam;
  int B, K;
};

cudaError_t prompt_loss(bool fp64, const StageArgs& args, const void* S, const void* L, const void* S_ref,
                        const void* scores, void* ell, void* dell_dS, cudaStream_t stream);

cudaError_t robust_reduce(bool fp64, const StageArgs& args, const void* ell, const void* h, void* loss,
                          void* weights, void* dloss_dell, cudaStream_t stream);

cudaError_t batch_stage(bool fp64, const StageArgs& args, const void* S, const void* L, const void* S_ref,
                        const void* scores, const void* h, void* ell, void* loss, void* weights, void* gS,
                        cudaStream_t stream);

}  // namespace cuda
}  // namespace dora
