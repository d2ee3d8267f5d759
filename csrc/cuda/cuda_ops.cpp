// CUDA implementations of the ops (schemas in csrc/bindings.cpp): argument checks, output allocation and
// the current stream, then the plain-CUDA launchers of csrc/cuda/dora_cuda.h. Compiled only in CUDA builds.
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <limits>

#include "dora_cuda.h"
#include "dora_ops.h"

namespace dora {
namespace {

cuda::DType dtype_of(const at::Tensor& logits) {
  switch (logits.scalar_type()) {
    case at::kFloat: return cuda::DType::kFloat32;
    case at::kBFloat16: return cuda::DType::kBFloat16;
    case at::kHalf: return cuda::DType::kFloat16;
    default: return cuda::DType::kFloat64;
  }
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

const void* optional_ptr(const std::optional<at::Tensor>& x) { return x.has_value() ? x->data_ptr() : nullptr; }

std::optional<at::Tensor> contiguous(const std::optional<at::Tensor>& x) {
  return x.has_value() ? std::optional<at::Tensor>(x->contiguous()) : std::nullopt;
}

cuda::RowShape row_shape(const at::Tensor& logits, int64_t ignore_index) {
  TORCH_CHECK(logits.size(0) * logits.size(1) <= std::numeric_limits<int32_t>::max(),
              "the CUDA row pass takes at most 2^31 - 1 token rows (N·T), got ", logits.size(0) * logits.size(1));
  cuda::RowShape shape{logits.size(0), logits.size(1), logits.size(2), logits.stride(0), logits.stride(1),
                       ignore_index, 1};
  shape.splits = cuda::row_splits(dtype_of(logits), shape);
  return shape;
}

cuda::StageArgs stage_args(int64_t loss_code, c10::ArrayRef<double> params, int64_t strategy_code, double lam,
                           int64_t B, int64_t K) {
  cuda::StageArgs args{};
  args.loss_code = static_cast<int>(loss_code);
  for (size_t i = 0; i < params.size(); ++i) args.params.value[i] = params[i];
  args.strategy_code = static_cast<int>(strategy_code);
  args.lam = lam;
  args.B = static_cast<int>(B);
  args.K = static_cast<int>(K);
  return args;
}

void backward_into(const at::Tensor& logits, const at::Tensor& grad, const at::Tensor& labels, const at::Tensor& lse,
                   const at::Tensor& gS, int64_t ignore_index) {
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor y = labels.contiguous(), l = lse.contiguous(), g = gS.contiguous();
  check_launch(cuda::seq_logprobs_bwd(dtype_of(logits), logits.data_ptr(), grad.data_ptr(), grad.stride(0),
                                      grad.stride(1), y.data_ptr<int64_t>(), l.data_ptr(), g.data_ptr(),
                                      row_shape(logits, ignore_index), current_stream()),
               "seq_logprobs_bwd");
}

}  // namespace

TensorTriple seq_logprobs_fwd_cuda(const at::Tensor& logits_in, const at::Tensor& labels_in, int64_t ignore_index) {
  check_rowpass_inputs(logits_in, labels_in);
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const at::Tensor logits = with_unit_vocabulary_stride(logits_in), labels = labels_in.contiguous();
  const int64_t N = logits.size(0), T = logits.size(1);
  const auto acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto options = logits.options().dtype(acc);
  at::Tensor S = at::empty({N}, options), L = at::empty({N}, options);
  at::Tensor lse = at::empty({N, T, 2}, options);  // RowNormaliser (m, log s) per token
  const cuda::RowShape shape = row_shape(logits, ignore_index);
  at::Tensor partial = at::empty({2 * N * T * shape.splits}, options);  // (max, sum) per row and split
  check_launch(cuda::seq_logprobs_fwd(dtype_of(logits), logits.data_ptr(), labels.data_ptr<int64_t>(), shape,
                                      lse.data_ptr(), partial.data_ptr(), S.data_ptr(), L.data_ptr(),
                                      current_stream()),
               "seq_logprobs_fwd");
  return {S, L, lse};
}

at::Tensor seq_logprobs_bwd_cuda(const at::Tensor& logits_in, const at::Tensor& labels, const at::Tensor& lse,
                                 const at::Tensor& gS, int64_t ignore_index) {
  check_rowpass_backward_inputs(logits_in, labels, lse, gS);
  const at::Tensor logits = with_unit_vocabulary_stride(logits_in);
  at::Tensor grad = empty_gradient_like(logits);
  backward_into(logits, grad, labels, lse, gS, ignore_index);
  return grad;
}

void seq_logprobs_bwd_inplace_cuda(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& lse,
                                   const at::Tensor& gS, int64_t ignore_index) {
  check_rowpass_backward_inputs(logits, labels, lse, gS);
  check_overwritable(logits);
  backward_into(logits, logits, labels, lse, gS, ignore_index);
}

void rescale_cuda(const at::Tensor& x, const at::Tensor& factor) {
  check_rescale_inputs(x, factor);
  const c10::cuda::CUDAGuard guard(x.device());
  check_launch(cuda::rescale(x.scalar_type() == at::kDouble, x.data_ptr(), x.numel(), factor.data_ptr(),
                             current_stream()),
               "rescale_");
}

TensorPair prompt_loss_cuda(const at::Tensor& S_in, const at::Tensor& L_in, const std::optional<at::Tensor>& S_ref_in,
                            const at::Tensor& scores_in, int64_t loss_code, c10::ArrayRef<double> params) {
  check_prompt_inputs(S_in, L_in, S_ref_in, scores_in, loss_code, params);
  const c10::cuda::CUDAGuard guard(S_in.device());
  const at::Tensor S = S_in.contiguous(), L = L_in.contiguous(), scores = scores_in.contiguous();
  const auto S_ref = contiguous(S_ref_in);
  const int64_t B = scores.size(0), K = scores.size(1);
  at::Tensor ell = at::empty({B}, S.options()), dell_dS = at::empty({B * K}, S.options());
  check_launch(cuda::prompt_loss(S.scalar_type() == at::kDouble, stage_args(loss_code, params, 0, 1.0, B, K),
                                 S.data_ptr(), L.data_ptr(), optional_ptr(S_ref), scores.data_ptr(), ell.data_ptr(),
                                 dell_dS.data_ptr(), current_stream()),
               "prompt_loss");
  return {ell, dell_dS};
}

TensorTriple robust_reduce_cuda(const at::Tensor& ell_in, const std::optional<at::Tensor>& h_in, int64_t strategy_code,
                                double lam) {
  check_reduce_inputs(ell_in, h_in, strategy_code, lam);
  const c10::cuda::CUDAGuard guard(ell_in.device());
  const at::Tensor ell = ell_in.contiguous();
  const auto h = contiguous(h_in);
  const int64_t B = ell.size(0);
  at::Tensor loss = at::empty({}, ell.options()), weights = at::empty({B}, ell.options());
  at::Tensor dloss_dell = at::empty({B}, ell.options());
  check_launch(cuda::robust_reduce(ell.scalar_type() == at::kDouble, stage_args(0, {}, strategy_code, lam, B, 1),
                                   ell.data_ptr(), optional_ptr(h), loss.data_ptr(), weights.data_ptr(),
                                   dloss_dell.data_ptr(), current_stream()),
               "robust_reduce");
  return {loss, weights, dloss_dell};
}

TensorQuad batch_stage_cuda(const at::Tensor& S_in, const at::Tensor& L_in, const std::optional<at::Tensor>& S_ref_in,
                            const at::Tensor& scores_in, const std::optional<at::Tensor>& h_in, int64_t loss_code,
                            c10::ArrayRef<double> params, int64_t strategy_code, double lam) {
  check_prompt_inputs(S_in, L_in, S_ref_in, scores_in, loss_code, params);
  const c10::cuda::CUDAGuard guard(S_in.device());
  const at::Tensor S = S_in.contiguous(), L = L_in.contiguous(), scores = scores_in.contiguous();
  const auto S_ref = contiguous(S_ref_in), h = contiguous(h_in);
  const int64_t B = scores.size(0), K = scores.size(1);
  at::Tensor ell = at::empty({B}, S.options());
  check_reduce_inputs(ell, h, strategy_code, lam);
  at::Tensor loss = at::empty({}, S.options()), weights = at::empty({B}, S.options());
  at::Tensor gS = at::empty({B * K}, S.options());
  check_launch(cuda::batch_stage(S.scalar_type() == at::kDouble, stage_args(loss_code, params, strategy_code, lam, B, K),
                                 S.data_ptr(), L.data_ptr(), optional_ptr(S_ref), scores.data_ptr(), optional_ptr(h),
                                 ell.data_ptr(), loss.data_ptr(), weights.data_ptr(), gS.data_ptr(), current_stream()),
               "batch_stage");
  return {loss, ell, weights, gS};
}

}  // namespace dora
