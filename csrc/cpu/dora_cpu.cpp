// CPU kernels of the DoRA op (docs/design.md section 5): the forward and backward row passes over the
// vocabulary, parallel over token rows with at::parallel_for, and the per-batch stage of
// csrc/include/dora_math.h run by one thread (B and K are small).
//
// Token row (n, t) starts at z + n·stride_n + t·stride_t and is contiguous over the vocabulary, so views
// such as logits[:, :-1] are read (and, in place, written) without a copy. A row is read in chunks of
// kChunk values that stay in L1: the chunk maximum, then Σ exp(z − m) against the running maximum m
// (dora_math.h's OnlineLse: NaN anywhere makes the row's log-sum-exp NaN), so the logits come from memory
// once per pass. bf16/fp16 chunks are widened to fp32 first; float64 stays float64.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

#include "dora_math.h"
#include "dora_ops.h"
#include "vec_exp.h"

namespace dora {
namespace {

constexpr int64_t kChunk = 512;
constexpr int64_t kRowGrainElements = 1 << 16;  // at::parallel_for grain: about this many logits a task

template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

inline float exp_acc(float x) { return vec_exp(x); }
inline double exp_acc(double x) { return std::exp(x); }

// The chunk as acc_t values: the logits themselves when no conversion is needed, else `buffer`.
template <typename scalar_t, typename acc_t>
const acc_t* widen(const scalar_t* src, int64_t n, acc_t* buffer) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return src;
  } else {
    for (int64_t i = 0; i < n; ++i) buffer[i] = static_cast<acc_t>(src[i]);
    return buffer;
  }
}

// The largest value, NaN skipped (OnlineLse sends NaN to the sum instead).
template <typename acc_t>
acc_t chunk_max(const acc_t* x, int64_t n) {
  acc_t m = -std::numeric_limits<acc_t>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

template <typename acc_t>
acc_t chunk_sum_exp(const acc_t* x, int64_t n, acc_t shift) {
  acc_t s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += exp_acc(x[i] - shift);
  return s;
}

// The running (max, Σ exp) pair of a whole row in one pass; NaN (or +∞) anywhere makes its sum NaN.
template <typename scalar_t, typename acc_t>
OnlineLse<acc_t> row_lse_state(const scalar_t* row, int64_t V) {
  acc_t buffer[kChunk];
  OnlineLse<acc_t> state{-std::numeric_limits<acc_t>::infinity(), acc_t(0)};
  for (int64_t c = 0; c < V; c += kChunk) {
    const int64_t n = std::min(kChunk, V - c);
    const acc_t* x = widen(row + c, n, buffer);
    state.raise_to(chunk_max(x, n), NaturalUnits{});
    state.s += chunk_sum_exp(x, n, state.shift(NaturalUnits{}).hi);
  }
  return state;
}

int64_t row_grain(int64_t V) { return std::max<int64_t>(1, kRowGrainElements / std::max<int64_t>(V, 1)); }

// The rows of a row pass: (N, T, V) with row strides, unit stride over V.
struct Rows {
  int64_t N, T, V, stride_n, stride_t;
  int64_t offset(int64_t r) const { return (r / T) * stride_n + (r % T) * stride_t; }
};

Rows rows_of(const at::Tensor& t) { return {t.size(0), t.size(1), t.size(2), t.stride(0), t.stride(1)}; }

template <typename scalar_t>
void forward_rows(const scalar_t* z, const Rows& rows, const int64_t* y, int64_t ignore_index,
                  acc_type<scalar_t>* lse, acc_type<scalar_t>* S, acc_type<scalar_t>* L) {
  using acc_t = acc_type<scalar_t>;
  const int64_t N = rows.N, T = rows.T, V = rows.V;
  // Token log-probs, summed per sequence afterwards in a fixed order (no atomics).
  std::vector<acc_t> lp(static_cast<size_t>(N * T));
  at::parallel_for(0, N * T, row_grain(V), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t label = y[r];
      if (label == ignore_index) {
        RowNormaliser<acc_t>{0, 0}.store(lse, r);
        lp[r] = 0;
        continue;
      }
      if (!label_in_vocabulary(label, V)) {  // unchecked input: a NaN row (dora_math.h)
        constexpr acc_t kNaN = std::numeric_limits<acc_t>::quiet_NaN();
        RowNormaliser<acc_t>{kNaN, kNaN}.store(lse, r);
        lp[r] = kNaN;
        continue;
      }
      const scalar_t* row = z + rows.offset(r);
      const OnlineLse<acc_t> state = row_lse_state<scalar_t, acc_t>(row, V);
      RowNormaliser<acc_t>::of(state, NaturalUnits{}).store(lse, r);
      lp[r] = state.log_prob(static_cast<acc_t>(row[label]), NaturalUnits{});
    }
  });
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      acc_t total = 0, count = 0;
      for (int64_t t = 0; t < T; ++t) {
        total += lp[n * T + t];
        count += y[n * T + t] != ignore_index ? acc_t(1) : acc_t(0);
      }
      S[n] = total;
      L[n] = count;
    }
  });
}

// out[n, t, :] = gS[n]·(onehot(y) − softmax(z[n, t, :])) with softmax = e^((z − m) − log s) from the saved
// normaliser (RowNormaliser); zero rows at ignored tokens, NaN rows at labels outside [0, V). out may be z
// (same rows).
template <typename scalar_t>
void backward_rows(const scalar_t* z, const Rows& in, scalar_t* out, const Rows& out_rows, const int64_t* y,
                   const acc_type<scalar_t>* lse, const acc_type<scalar_t>* gS, int64_t ignore_index) {
  using acc_t = acc_type<scalar_t>;
  const int64_t T = in.T, V = in.V;
  at::parallel_for(0, in.N * T, row_grain(V), [&](int64_t begin, int64_t end) {
    acc_t buffer[kChunk];
    for (int64_t r = begin; r < end; ++r) {
      const int64_t label = y[r];
      scalar_t* dst = out + out_rows.offset(r);
      if (label == ignore_index) {
        std::fill(dst, dst + V, scalar_t(0));
        continue;
      }
      const bool in_vocabulary = label_in_vocabulary(label, V);
      const scalar_t* row = z + in.offset(r);
      const acc_t g = gS[r / T];
      constexpr acc_t kNaN = std::numeric_limits<acc_t>::quiet_NaN();
      const RowNormaliser<acc_t> norm =
          in_vocabulary ? RowNormaliser<acc_t>::load(lse, r) : RowNormaliser<acc_t>{kNaN, kNaN};
      const acc_t m = norm.m, log_s = norm.log_s;
      // The label's entry in the accumulation dtype before the cast (bf16 would cancel), read before the
      // row is overwritten.
      const acc_t target = in_vocabulary ? norm.label_gradient(g, static_cast<acc_t>(row[label])) : kNaN;
      for (int64_t c = 0; c < V; c += kChunk) {
        const int64_t n = std::min(kChunk, V - c);
        const acc_t* x = widen(row + c, n, buffer);
        if constexpr (std::is_same_v<scalar_t, acc_t>) {
#pragma omp simd
          for (int64_t i = 0; i < n; ++i) dst[c + i] = -g * exp_acc((x[i] - m) - log_s);
        } else {
#pragma omp simd
          for (int64_t i = 0; i < n; ++i) buffer[i] = -g * exp_acc((x[i] - m) - log_s);
          for (int64_t i = 0; i < n; ++i) dst[c + i] = static_cast<scalar_t>(buffer[i]);
        }
      }
      if (in_vocabulary) dst[label] = static_cast<scalar_t>(target);
    }
  });
}

template <typename T>
const T* optional_data(const std::optional<at::Tensor>& x) {
  return x.has_value() ? x->data_ptr<T>() : nullptr;
}

std::optional<at::Tensor> contiguous(const std::optional<at::Tensor>& x) {
  return x.has_value() ? std::optional<at::Tensor>(x->contiguous()) : std::nullopt;
}

template <typename T>
void params_as(c10::ArrayRef<double> params, T* out) {
  for (size_t i = 0; i < params.size(); ++i) out[i] = static_cast<T>(params[i]);
}

}  // namespace

TensorTriple seq_logprobs_fwd_cpu(const at::Tensor& logits_in, const at::Tensor& labels_in, int64_t ignore_index) {
  check_rowpass_inputs(logits_in, labels_in);
  const at::Tensor logits = with_unit_vocabulary_stride(logits_in), labels = labels_in.contiguous();
  const int64_t N = logits.size(0), T = logits.size(1);
  const auto acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor S = at::empty({N}, logits.options().dtype(acc));
  at::Tensor L = at::empty({N}, logits.options().dtype(acc));
  at::Tensor lse = at::empty({N, T, 2}, logits.options().dtype(acc));  // RowNormaliser (m, log s) per token
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "seq_logprobs_fwd_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    forward_rows<scalar_t>(logits.data_ptr<scalar_t>(), rows_of(logits), labels.data_ptr<int64_t>(), ignore_index,
                           lse.data_ptr<acc_t>(), S.data_ptr<acc_t>(), L.data_ptr<acc_t>());
  });
  return {S, L, lse};
}

namespace {
void backward_into(const at::Tensor& logits, const at::Tensor& out, const at::Tensor& labels_in,
                   const at::Tensor& lse_in, const at::Tensor& gS_in, int64_t ignore_index) {
  const at::Tensor labels = labels_in.contiguous(), lse = lse_in.contiguous(), gS = gS_in.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "seq_logprobs_bwd_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    backward_rows<scalar_t>(logits.data_ptr<scalar_t>(), rows_of(logits), out.data_ptr<scalar_t>(), rows_of(out),
                            labels.data_ptr<int64_t>(), lse.data_ptr<acc_t>(), gS.data_ptr<acc_t>(), ignore_index);
  });
}
}  // namespace

at::Tensor seq_logprobs_bwd_cpu(const at::Tensor& logits_in, const at::Tensor& labels, const at::Tensor& lse,
                                const at::Tensor& gS, int64_t ignore_index) {
  check_rowpass_backward_inputs(logits_in, labels, lse, gS);
  const at::Tensor logits = with_unit_vocabulary_stride(logits_in);
  at::Tensor out = empty_gradient_like(logits);
  backward_into(logits, out, labels, lse, gS, ignore_index);
  return out;
}

void seq_logprobs_bwd_inplace_cpu(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& lse,
                                  const at::Tensor& gS, int64_t ignore_index) {
  check_rowpass_backward_inputs(logits, labels, lse, gS);
  check_overwritable(logits);
  backward_into(logits, logits, labels, lse, gS, ignore_index);
}

void rescale_cpu(const at::Tensor& x, const at::Tensor& factor) {
  check_rescale_inputs(x, factor);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rescale_cpu", [&] {
    const scalar_t f = factor.data_ptr<scalar_t>()[0];
    if (f == scalar_t(1)) return;
    scalar_t* data = x.data_ptr<scalar_t>();
    at::parallel_for(0, x.numel(), 1 << 16, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) data[i] *= f;
    });
  });
}

TensorPair prompt_loss_cpu(const at::Tensor& S_in, const at::Tensor& L_in, const std::optional<at::Tensor>& S_ref_in,
                           const at::Tensor& scores_in, int64_t loss_code, c10::ArrayRef<double> params) {
  check_prompt_inputs(S_in, L_in, S_ref_in, scores_in, loss_code, params);
  const at::Tensor S = S_in.contiguous(), L = L_in.contiguous(), scores = scores_in.contiguous();
  const auto S_ref = contiguous(S_ref_in);
  const int64_t B = scores.size(0), K = scores.size(1);
  at::Tensor ell = at::empty({B}, S.options());
  at::Tensor dell_dS = at::empty({B * K}, S.options());
  AT_DISPATCH_FLOATING_TYPES(S.scalar_type(), "prompt_loss_cpu", [&] {
    scalar_t prm[kMaxLossParams];
    params_as(params, prm);
    SerialBlock<scalar_t> block;
    prompt_losses<scalar_t>(static_cast<int>(loss_code), prm, static_cast<int>(B), static_cast<int>(K),
                            S.data_ptr<scalar_t>(), L.data_ptr<scalar_t>(), optional_data<scalar_t>(S_ref),
                            scores.data_ptr<scalar_t>(), block, ell.data_ptr<scalar_t>(),
                            dell_dS.data_ptr<scalar_t>());
  });
  return {ell, dell_dS};
}

TensorTriple robust_reduce_cpu(const at::Tensor& ell_in, const std::optional<at::Tensor>& h_in,
                               int64_t strategy_code, double lam) {
  check_reduce_inputs(ell_in, h_in, strategy_code, lam);
  const at::Tensor ell = ell_in.contiguous();
  const auto h = contiguous(h_in);
  const int64_t B = ell.size(0);
  at::Tensor loss = at::empty({}, ell.options());
  at::Tensor weights = at::empty({B}, ell.options());
  at::Tensor dloss_dell = at::empty({B}, ell.options());
  AT_DISPATCH_FLOATING_TYPES(ell.scalar_type(), "robust_reduce_cpu", [&] {
    SerialBlock<scalar_t> block;
    robust_reduce<scalar_t>(static_cast<int>(strategy_code), static_cast<scalar_t>(lam), static_cast<int>(B),
                            ell.data_ptr<scalar_t>(), optional_data<scalar_t>(h), block, loss.data_ptr<scalar_t>(),
                            weights.data_ptr<scalar_t>(), dloss_dell.data_ptr<scalar_t>());
  });
  return {loss, weights, dloss_dell};
}

TensorQuad batch_stage_cpu(const at::Tensor& S_in, const at::Tensor& L_in, const std::optional<at::Tensor>& S_ref_in,
                           const at::Tensor& scores_in, const std::optional<at::Tensor>& h_in, int64_t loss_code,
                           c10::ArrayRef<double> params, int64_t strategy_code, double lam) {
  check_prompt_inputs(S_in, L_in, S_ref_in, scores_in, loss_code, params);
  const at::Tensor S = S_in.contiguous(), L = L_in.contiguous(), scores = scores_in.contiguous();
  const auto S_ref = contiguous(S_ref_in), h = contiguous(h_in);
  const int64_t B = scores.size(0), K = scores.size(1);
  at::Tensor ell = at::empty({B}, S.options());
  check_reduce_inputs(ell, h, strategy_code, lam);
  at::Tensor loss = at::empty({}, S.options());
  at::Tensor weights = at::empty({B}, S.options());
  at::Tensor gS = at::empty({B * K}, S.options());
  AT_DISPATCH_FLOATING_TYPES(S.scalar_type(), "batch_stage_cpu", [&] {
    scalar_t prm[kMaxLossParams];
    params_as(params, prm);
    SerialBlock<scalar_t> block;
    batch_stage<scalar_t>(static_cast<int>(loss_code), prm, static_cast<int>(strategy_code),
                          static_cast<scalar_t>(lam), static_cast<int>(B), static_cast<int>(K),
                          S.data_ptr<scalar_t>(), L.data_ptr<scalar_t>(), optional_data<scalar_t>(S_ref),
                          scores.data_ptr<scalar_t>(), optional_data<scalar_t>(h), block, ell.data_ptr<scalar_t>(),
                          gS.data_ptr<scalar_t>(), loss.data_ptr<scalar_t>(), weights.data_ptr<scalar_t>(),
                          gS.data_ptr<scalar_t>());
  });
  return {loss, ell, weights, gS};
}

}  // namespace dora
