// Registers the DoRA ops (docs/design.md section 5) as torch.ops.dora_engine.* with CPU and CUDA kernels.
//
//   seq_logprobs_fwd   row pass (1): S, L (N,) and the per-token log-sum-exp lse (N, T, 2), kept as the pair
//                      (row max m, log Σ e^(z − m)) so that the backward is exact at any magnitude
//                      (dora_math.h's RowNormaliser)
//   seq_logprobs_bwd   row pass (3): dz = gS[n]·(onehot(y) − softmax(z)) into a new tensor
//   seq_logprobs_bwd_  the same, written over the logits (which the caller no longer needs)
//   prompt_loss        stage (2a): ℓ (B,) and ∂ℓ_b/∂S_n (N,)
//   robust_reduce      stage (2b): ℒ, the strategy's weights (B,) and ∂ℒ/∂ℓ (B,)
//   batch_stage        (2a) + (2b) + gS[n] = ∂ℒ/∂ℓ_b·∂ℓ_b/∂S_n in one call (one launch on the GPU)
//   rescale_           x *= factor (a one-value tensor) unless factor == 1: the fused-linear accumulators'
//                      rescale, decided on the device without a host synchronisation
//   contract           what Python must agree with, read from the header: the response limit, each loss
//                      code's name, parameter count and need of a reference, each strategy code's name
//   rows_disjoint      whether seq_logprobs_bwd_ may overwrite these logits (the in-place rule)
//
// dora_engine/ops/contract.py calls the last two when the extension loads and refuses it (OpLoadError)
// when they disagree with the registry of dora_engine/losses.py.
//
// The row passes take logits with any row strides and a unit stride over the vocabulary (others are copied
// once); the backward writes a new gradient with the logits' 16-byte alignment, or over the logits.
//
// Loss and strategy codes and the parameter order come from dora_engine/losses.py.
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstdint>
#include <string>
#include <tuple>

#include "dora_math.h"
#include "dora_ops.h"

namespace dora {

namespace {

bool is_accumulation_dtype(at::ScalarType t) { return t == at::kFloat || t == at::kDouble; }

void check_same_device(const at::Tensor& x, const char* name, const at::Tensor& ref) {
  TORCH_CHECK(x.device() == ref.device(), name, " is on ", x.device(), " but the other inputs on ", ref.device());
}

void check_vector(const at::Tensor& x, const char* name, int64_t size, const at::Tensor& ref) {
  TORCH_CHECK(x.dim() == 1 && x.size(0) == size, name, " must have shape (", size, ",), got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == ref.scalar_type(), name, " must have dtype ", ref.scalar_type(), ", got ",
              x.scalar_type());
  check_same_device(x, name, ref);
}

}  // namespace

void check_rowpass_inputs(const at::Tensor& logits, const at::Tensor& labels) {
  TORCH_CHECK(logits.dim() == 3, "logits must be a 3-D tensor (N, T, V), got shape ", logits.sizes());
  const auto t = logits.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kBFloat16 || t == at::kHalf || t == at::kDouble,
              "logits must be float32, bfloat16, float16 or float64, got ", t);
  TORCH_CHECK(labels.dim() == 2 && labels.size(0) == logits.size(0) && labels.size(1) == logits.size(1),
              "labels must have shape (", logits.size(0), ", ", logits.size(1), ") (N, T), got ", labels.sizes());
  TORCH_CHECK(labels.scalar_type() == at::kLong, "labels must be int64, got ", labels.scalar_type());
  check_same_device(labels, "labels", logits);
}

void check_rowpass_backward_inputs(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& lse,
                                   const at::Tensor& gS) {
  check_rowpass_inputs(logits, labels);
  const auto acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == labels.size(0) && lse.size(1) == labels.size(1) && lse.size(2) == 2,
              "lse must have shape (", labels.size(0), ", ", labels.size(1), ", 2) (N, T, (m, log s)), got ",
              lse.sizes());
  TORCH_CHECK(lse.scalar_type() == acc, "lse must have dtype ", acc, ", got ", lse.scalar_type());
  check_same_device(lse, "lse", logits);
  TORCH_CHECK(gS.dim() == 1 && gS.size(0) == logits.size(0), "gS must have shape (", logits.size(0),
              ",), got ", gS.sizes());
  TORCH_CHECK(gS.scalar_type() == acc, "gS must have dtype ", acc, ", got ", gS.scalar_type());
  check_same_device(gS, "gS", logits);
}

at::Tensor with_unit_vocabulary_stride(const at::Tensor& logits) {
  return logits.size(2) <= 1 || logits.stride(2) == 1 ? logits : logits.contiguous();
}

bool rows_disjoint(const at::Tensor& logits) {
  // Rows (n, t) of V values at n·stride_n + t·stride_t: disjoint when, taking the dimensions of more than
  // one row by increasing stride, each stride clears everything the smaller one spans.
  if (logits.size(2) > 1 && logits.stride(2) != 1) return false;
  int64_t span = logits.size(2);  // values one row spans
  int64_t sizes[2] = {logits.size(0), logits.size(1)}, strides[2] = {logits.stride(0), logits.stride(1)};
  if (strides[0] < strides[1] || (strides[0] == strides[1] && sizes[0] > sizes[1])) {
    std::swap(sizes[0], sizes[1]);
    std::swap(strides[0], strides[1]);
  }
  for (int d = 1; d >= 0; --d) {  // the smaller stride first
    if (sizes[d] <= 1) continue;
    if (strides[d] < span) return false;
    span = strides[d] * (sizes[d] - 1) + span;
  }
  return true;
}

void check_overwritable(const at::Tensor& logits) {
  TORCH_CHECK(rows_disjoint(logits), "seq_logprobs_bwd_: logits must have a unit stride over the vocabulary and rows "
              "that do not overlap to be overwritten in place, got strides ", logits.strides());
}

at::Tensor empty_gradient_like(const at::Tensor& logits) {
  // A contiguous (N, T, V) tensor starting at the same address modulo 16 bytes as the logits, so that the
  // row passes pair 16-byte loads with 16-byte stores wherever the rows line up (always for contiguous
  // logits; for strided views when a row's size is a multiple of 16 bytes).
  const int64_t numel = logits.numel(), size = logits.element_size();
  const int64_t offset = static_cast<int64_t>(reinterpret_cast<uintptr_t>(logits.data_ptr()) % 16);
  if (numel == 0 || offset == 0 || offset % size != 0) return at::empty(logits.sizes(), logits.options());
  const int64_t pad = 16 / size;
  at::Tensor storage = at::empty({numel + pad}, logits.options());
  const int64_t base = static_cast<int64_t>(reinterpret_cast<uintptr_t>(storage.data_ptr()) % 16);
  const int64_t shift = ((offset - base + 16) % 16) / size;
  return storage.narrow(0, shift, numel).view(logits.sizes());
}

void check_rescale_inputs(const at::Tensor& x, const at::Tensor& factor) {
  TORCH_CHECK(is_accumulation_dtype(x.scalar_type()), "rescale_: x must be float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(x.is_contiguous(), "rescale_: x must be contiguous");
  TORCH_CHECK(factor.numel() == 1 && factor.scalar_type() == x.scalar_type(), "rescale_: factor must be one ",
              x.scalar_type(), " value, got shape ", factor.sizes(), " and dtype ", factor.scalar_type());
  check_same_device(factor, "factor", x);
}

void check_prompt_inputs(const at::Tensor& S, const at::Tensor& L, const std::optional<at::Tensor>& S_ref,
                         const at::Tensor& scores, int64_t loss_code, c10::ArrayRef<double> params) {
  TORCH_CHECK(loss_code >= 0 && loss_code < kNumLosses, "unknown loss code ", loss_code);
  TORCH_CHECK(static_cast<int64_t>(params.size()) == loss_param_count(static_cast<int>(loss_code)), "loss code ",
              loss_code, " takes ", loss_param_count(static_cast<int>(loss_code)), " parameters, got ",
              params.size());
  TORCH_CHECK(is_accumulation_dtype(S.scalar_type()), "S must be float32 or float64, got ", S.scalar_type());
  TORCH_CHECK(scores.dim() == 2, "scores must have shape (B, K), got ", scores.sizes());
  const int64_t B = scores.size(0), K = scores.size(1);
  TORCH_CHECK(B >= 1 && K >= 2, "scores must have shape (B, K) with B >= 1 and K >= 2, got ", scores.sizes());
  TORCH_CHECK(K <= kMaxResponses, "num_responses K = ", K, " exceeds the fused op's limit of ", kMaxResponses);
  TORCH_CHECK(scores.scalar_type() == S.scalar_type(), "scores must have dtype ", S.scalar_type(), ", got ",
              scores.scalar_type());
  check_same_device(scores, "scores", S);
  check_vector(S, "S", B * K, S);
  check_vector(L, "L", B * K, S);
  if (S_ref.has_value()) {
    check_vector(*S_ref, "S_ref", B * K, S);
  } else {
    TORCH_CHECK(!loss_needs_reference(static_cast<int>(loss_code)), "loss code ", loss_code,
                " needs reference log-probs S_ref");
  }
}

void check_reduce_inputs(const at::Tensor& ell, const std::optional<at::Tensor>& h, int64_t strategy_code,
                         double lam) {
  TORCH_CHECK(strategy_code >= 0 && strategy_code < kNumStrategies, "unknown strategy code ", strategy_code);
  TORCH_CHECK(lam > 0 && std::isfinite(lam), "lam must be a finite number > 0, got ", lam);
  TORCH_CHECK(is_accumulation_dtype(ell.scalar_type()), "ell must be float32 or float64, got ", ell.scalar_type());
  TORCH_CHECK(ell.dim() == 1 && ell.size(0) >= 1, "ell must have shape (B,) with B >= 1, got ", ell.sizes());
  if (h.has_value()) check_vector(*h, "h", ell.size(0), ell);
}

// The registry name of each code (LossSpec.name, StrategySpec.name), tied to the enumerators of dora_math.h.
const char* loss_name(int code) {
  switch (code) {
    case kDpo: return "dpo";
    case kRdpo: return "rdpo";
    case kIpo: return "ipo";
    case kRobustDpo: return "robust_dpo";
    case kExo: return "exo";
    case kSimpo: return "simpo";
    case kDpoPl: return "dpo_pl";
    case kRrhf: return "rrhf";
    case kLire: return "lire";
    default: return "";
  }
}

const char* strategy_name(int code) {
  switch (code) {
    case kErm: return "erm";
    case kReweight: return "reweight";
    case kDro: return "dro";
    case kDora: return "dora";
    case kDrdpo: return "drdpo";
    default: return "";
  }
}

std::tuple<int64_t, c10::List<std::string>, c10::List<int64_t>, c10::List<bool>, c10::List<std::string>> contract() {
  c10::List<std::string> losses, strategies;
  c10::List<int64_t> param_counts;
  c10::List<bool> needs_reference;
  for (int code = 0; code < kNumLosses; ++code) {
    losses.push_back(loss_name(code));
    param_counts.push_back(loss_param_count(code));
    needs_reference.push_back(loss_needs_reference(code));
  }
  for (int code = 0; code < kNumStrategies; ++code) strategies.push_back(strategy_name(code));
  return {kMaxResponses, losses, param_counts, needs_reference, strategies};
}

}  // namespace dora

TORCH_LIBRARY(dora_engine, m) {
  m.def("seq_logprobs_fwd(Tensor logits, Tensor labels, int ignore_index) -> (Tensor S, Tensor L, Tensor lse)");
  m.def("seq_logprobs_bwd(Tensor logits, Tensor labels, Tensor lse, Tensor gS, int ignore_index) -> Tensor");
  m.def("seq_logprobs_bwd_(Tensor(a!) logits, Tensor labels, Tensor lse, Tensor gS, int ignore_index) -> ()");
  m.def("prompt_loss(Tensor S, Tensor L, Tensor? S_ref, Tensor scores, int loss_code, float[] params) "
        "-> (Tensor ell, Tensor dell_dS)");
  m.def("robust_reduce(Tensor ell, Tensor? h, int strategy_code, float lam) "
        "-> (Tensor loss, Tensor weights, Tensor dloss_dell)");
  m.def("batch_stage(Tensor S, Tensor L, Tensor? S_ref, Tensor scores, Tensor? h, int loss_code, float[] params, "
        "int strategy_code, float lam) -> (Tensor loss, Tensor ell, Tensor weights, Tensor gS)");
  m.def("rescale_(Tensor(a!) x, Tensor factor) -> ()");
  // No device kernels: these read only the header's constants and a tensor's sizes and strides.
  m.def("contract() -> (int max_responses, str[] losses, int[] loss_param_counts, bool[] loss_needs_reference, "
        "str[] strategies)", &dora::contract);
  m.def("rows_disjoint(Tensor logits) -> bool", &dora::rows_disjoint);
}

#define DORA_REGISTER_BACKEND(m, suffix)                                   \
  m.impl("seq_logprobs_fwd", &dora::seq_logprobs_fwd_##suffix);           \
  m.impl("seq_logprobs_bwd", &dora::seq_logprobs_bwd_##suffix);           \
  m.impl("seq_logprobs_bwd_", &dora::seq_logprobs_bwd_inplace_##suffix);  \
  m.impl("prompt_loss", &dora::prompt_loss_##suffix);                     \
  m.impl("robust_reduce", &dora::robust_reduce_##suffix);                 \
  m.impl("batch_stage", &dora::batch_stage_##suffix);                     \
  m.impl("rescale_", &dora::rescale_##suffix);

TORCH_LIBRARY_IMPL(dora_engine, CPU, m) { DORA_REGISTER_BACKEND(m, cpu) }

#ifdef DORA_WITH_CUDA
TORCH_LIBRARY_IMPL(dora_engine, CUDA, m) { DORA_REGISTER_BACKEND(m, cuda) }
#endif
