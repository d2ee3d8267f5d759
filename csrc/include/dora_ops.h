// The op implementations registered by csrc/bindings.cpp (schemas there), one per backend.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace dora {

using TensorTriple = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using TensorQuad = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using TensorPair = std::tuple<at::Tensor, at::Tensor>;

// Argument checks shared by both backends (csrc/bindings.cpp); they name the offending argument.
void check_rowpass_inputs(const at::Tensor& logits, const at::Tensor& labels);
void check_rowpass_backward_inputs(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& lse,
                                   const at::Tensor& gS);
void check_prompt_inputs(const at::Tensor& S, const at::Tensor& L, const std::optional<at::Tensor>& S_ref,
                         const at::Tensor& scores, int64_t loss_code, c10::ArrayRef<double> params);
void check_reduce_inputs(const at::Tensor& ell, const std::optional<at::Tensor>& h, int64_t strategy_code,
                         double lam);
void check_rescale_inputs(const at::Tensor& x, const at::Tensor& factor);

// Row-pass layouts shared by both backends (csrc/bindings.cpp). The kernels take any row strides and need a
// unit stride over the vocabulary: the logits themselves when they have one, else a contiguous copy.
at::Tensor with_unit_vocabulary_stride(const at::Tensor& logits);
// Whether the (N, T, V) rows of `logits` have a unit vocabulary stride and do not overlap in memory.
bool rows_disjoint(const at::Tensor& logits);
// Refuses logits that the backward cannot overwrite in place (rows_disjoint false), naming the strides.
void check_overwritable(const at::Tensor& logits);
// A new contiguous gradient for `logits` that starts at the same address modulo 16 bytes.
at::Tensor empty_gradient_like(const at::Tensor& logits);

#define DORA_DECLARE_BACKEND(suffix)                                                                        \
  TensorTriple seq_logprobs_fwd_##suffix(const at::Tensor& logits, const at::Tensor& labels,                 \
                                         int64_t ignore_index);                                             \
  at::Tensor seq_logprobs_bwd_##suffix(const at::Tensor& logits, const at::Tensor& labels,                   \
                                       const at::Tensor& lse, const at::Tensor& gS, int64_t ignore_index);  \
  void seq_logprobs_bwd_inplace_##suffix(const at::Tensor& logits, const at::Tensor& labels,                 \
                                         const at::Tensor& lse, const at::Tensor& gS, int64_t ignore_index); \
  TensorPair prompt_loss_##suffix(const at::Tensor& S, const at::Tensor& L,                                  \
                                  const std::optional<at::Tensor>& S_ref, const at::Tensor& scores,          \
                                  int64_t loss_code, c10::ArrayRef<double> params);                     \
  TensorTriple robust_reduce_##suffix(const at::Tensor& ell, const std::optional<at::Tensor>& h,             \
                                      int64_t strategy_code, double lam);                                   \
  TensorQuad batch_stage_##suffix(const at::Tensor& S, const at::Tensor& L,                                  \
                                  const std::optional<at::Tensor>& S_ref, const at::Tensor& scores,          \
                                  const std::optional<at::Tensor>& h, int64_t loss_code,                     \
                                  c10::ArrayRef<double> params, int64_t strategy_code, double lam);          \
  void rescale_##suffix(const at::Tensor& x, const at::Tensor& factor);

DORA_DECLARE_BACKEND(cpu)
#ifdef DORA_WITH_CUDA
DORA_DECLARE_BACKEND(cuda)
#endif

#undef DORA_DECLARE_BACKEND

}  // namespace dora
