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
                                  c10::ArrayRef<double> params, int64_t strategy_code, double lam);

DORA_DECLARE_BACKEND(cpu)
#ifdef DORA_WITH_CUDA
DORA_DECLARE_BACKEND(cuda)
#endif

#undef DORA_DECLARE_BACKEND

}  // namespace dora
