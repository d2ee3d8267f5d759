// CPU kernels of the DoRA op (DESIGN.md section 5): the forward and backward row passes over the
// vocabulary, parallel over token rows with at::parallel_for, and the per-batch stage of
// csrc/include/dora_math.h run by one thread (B and K are small).
//
// A row is read in chunks of kChunk values that stay in L1: the chunk maximum, then Σ exp(z − m)
// against the running maximum m (rescaling the running sum when m grows), so the logits come from
// memory once per pass. bf16/fp16 chunks are widened to fp32 first; float64 stays float64.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <algorithm>
#include <atomic>
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

// log Σ_v exp(row[v]) in one pass over the row (NaN propagates through the sum).
template <typename scalar_t, typename acc_t>
acc_t row_logsumexp(const scalar_t* row, int64_t V) {
  acc_t buffer[kChunk];
  acc_t m = -std::numeric_limits<acc_t>::infinity();
  acc_t s = 0;
  for (int64_t c = 0; c < V; c += kChunk) {
    const int64_t n = std::min(kChunk, V - c);
    const acc_t* x = widen(row + c, n, buffer);
    const acc_t cm = chunk_max(x, n);
    if (cm > m) {
      s *= std::exp(m - cm);
      m = cm;
    }
    if (m == -std::numeric_limits<acc_t>::infinity()) continue;  // every value so far is −∞
    s += chunk_sum_exp(x, n, m);
  }
  return m + std::log(s);
}

int64_t row_grain(int64_t V) { return std::max<int64_t>(1, kRowGrainElements / std::max<int64_t>(V, 1)); }

// A label outside [0, V) that is not ignore_index: the first such (lowest) row index, or -1.
struct BadLabel {
  std::atomic<int64_t> row{std::numeric_limits<int64_t>::max()};
  void record(int64_t r) {
    int64_t seen = row.load();
    while (r < seen && !row.compare_exchange_weak(seen, r)) {
    }
  }
  void raise_if_any(const int64_t* labels, int64_t T, int64_t V, int64_t ignore_index) const {
    const int64_t r = row.load();
    TORCH_CHECK(r == std::numeric_limits<int64_t>::max(), "labels[", r / T, ", ", r % T, "] = ", labels[r],
                " is outside [0, ", V, ") and is not ignore_index (", ignore_index, ")");
  }
};

template <typename scalar_t>
void forward_rows(const scalar_t* z, const int64_t* y, int64_t N, int64_t T, int64_t V, int64_t ignore_index,
                  acc_type<scalar_t>* lse, acc_type<scalar_t>* S, acc_type<scalar_t>* L) {
  using acc_t = acc_type<scalar_t>;
  BadLabel bad;
  // Token log-probs, summed per sequence afterwards in a fixed order (no atomics).
  std::vector<acc_t> lp(static_cast<size_t>(N * T));
  at::parallel_for(0, N * T, row_grain(V), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t label = y[r];
      if (label == ignore_index || label < 0 || label >= V) {
        if (label != ignore_index) bad.record(r);
        lse[r] = 0;
        lp[r] = 0;
        continue;
      }
      const scalar_t* row = z + r * V;
      lse[r] = row_logsumexp<scalar_t, acc_t>(row, V);
      lp[r] = static_cast<acc_t>(row[label]) - lse[r];
    }
  });
  bad.raise_if_any(y, T, V, ignore_index);
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

// out[n, t, :] = gS[n]·(onehot(y) − softmax(z[n, t, :])); zero rows at ignored tokens. out may be z.
template <typename scalar_t>
void backward_rows(const scalar_t* z, scalar_t* out, const int64_t* y, const acc_type<scalar_t>* lse,
                   const acc_type<scalar_t>* gS, int64_t N, int64_t T, int64_t V, int64_t ignore_index) {
  using acc_t = acc_type<scalar_t>;
  BadLabel bad;
  at::parallel_for(0, N * T, row_grain(V), [&](int64_t begin, int64_t end) {
    acc_t buffer[kChunk];
    for (int64_t r = begin; r < end; ++r) {
      const int64_t label = y[r];
      scalar_t* dst = out + r * V;
      if (label == ignore_index || label < 0 || label >= V) {
        if (label != ignore_index) bad.record(r);
        std::fill(dst, dst + V, scalar_t(0));
        continue;
      }
      const scalar_t* row = z + r * V;
      const acc_t g = gS[r / T], shift = lse[r];
      // The target term g·(1 − p_y) in the accumulation dtype before the cast (bf16 would cancel).
      const acc_t target = g * (acc_t(1) - std::exp(static_cast<acc_t>(row[label]) - shift));
      for (int64_t c = 0; c < V; c += kChunk) {
        const int64_t n = std::min(kChunk, V - c);
        const acc_t* x = widen(row + c, n, buffer);
        if constexpr (std::is_same_v<scalar_t, acc_t>) {
#pragma omp simd
          for (int64_t i = 0; i < n; ++i) dst[c + i] = -g * exp_acc(x[i] - shift);
        } else {
#pragma omp simd
          for (int64_t i = 0; i < n; ++i) buffer[i] = -g * exp_acc(x[i] - shift);
          for (int64_t i = 0; i < n; ++i) dst[c + i] = static_cast<scalar_t>(buffer[i]);
        }
      }
      dst[label] = static_cast<scalar_t>(target);
    }
  });
  bad.raise_if_any(y, T, V, ignore_index);
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
  const at::Tensor logits = logits_in.contiguous(), labels = labels_in.contiguous();
  const int64_t N = logits.size(0), T = logits.size(1), V = logits.size(2);
  const auto acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor S = at::empty({N}, logits.options().dtype(acc));
  at::Tensor L = at::empty({N}, logits.options().dtype(acc));
  at::Tensor lse = at::empty({N, T}, logits.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "seq_logprobs_fwd_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    forward_rows<scalar_t>(logits.data_ptr<scalar_t>(), labels.data_ptr<int64_t>(), N, T, V, ignore_index,
                           lse.data_ptr<acc_t>(), S.data_ptr<acc_t>(), L.data_ptr<acc_t>());
  });
  return {S, L, lse};
}

namespace {
void backward_into(const at::Tensor& logits, const at::Tensor& out, const at::Tensor& labels_in,
                   const at::Tensor& lse_in, const at::Tensor& gS_in, int64_t ignore_index) {
  const at::Tensor labels = labels_in.contiguous(), lse = lse_in.contiguous(), gS = gS_in.contiguous();
  const int64_t N = logits.size(0), T = logits.size(1), V = logits.size(2);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "seq_logprobs_bwd_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    backward_rows<scalar_t>(logits.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), labels.data_ptr<int64_t>(),
                            lse.data_ptr<acc_t>(), gS.data_ptr<acc_t>(), N, T, V, ignore_index);
  });
}
}  // namespace

at::Tensor seq_logprobs_bwd_cpu(const at::Tensor& logits_in, const at::Tensor& labels, const at::Tensor& lse,
                                const at::Tensor& gS, int64_t ignore_index) {
  check_rowpass_backward_inputs(logits_in, labels, lse, gS);
  const at::Tensor logits = logits_in.contiguous();
  at::Tensor out = at::empty_like(logits);
  backward_into(logits, out, labels, lse, gS, ignore_index);
  return out;
}

void seq_logprobs_bwd_inplace_cpu(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& lse,
                                  const at::Tensor& gS, int64_t ignore_index) {
  check_rowpass_backward_inputs(logits, labels, lse, gS);
  TORCH_CHECK(logits.is_contiguous(), "seq_logprobs_bwd_: logits must be contiguous to be overwritten in place");
  backward_into(logits, logits, labels, lse, gS, ignore_index);
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
