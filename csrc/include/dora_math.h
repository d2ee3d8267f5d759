// Per-batch stage of the DoRA op (docs/design.md sections 4-5): per-prompt losses ℓ_b with their
// gradients ∂ℓ_b/∂S, and the robust reduction over prompts with its weights and ∂ℒ/∂ℓ_b.
//
// Written once for the CPU and CUDA kernels: every function is `DORA_HD` (host and device under
// nvcc, plain inline under a host compiler). The reductions over prompts are expressed against a
// `Block` policy (rank(), size(), sum(), max(), sync()) so that the same code runs as a serial loop
// on the CPU and as one thread block on the GPU. No torch header: nvcc compiles this alone.
#pragma once

#include <math.h>
#include <stdint.h>

#ifdef __CUDACC__
#define DORA_HD __host__ __device__ __forceinline__
#define DORA_HD_TEMPLATE_CALLS_DEVICE _Pragma("nv_exec_check_disable")
#else
#define DORA_HD inline
#define DORA_HD_TEMPLATE_CALLS_DEVICE
#endif

namespace dora {

// The largest number of responses per prompt K that the per-prompt scratch arrays hold.
constexpr int kMaxResponses = 64;
constexpr int kMaxLossParams = 4;

// Codes of dora_engine/losses.py (LossSpec.code, StrategySpec.code): the registry is the source.
enum LossCode : int { kDpo = 0, kRdpo, kIpo, kRobustDpo, kExo, kSimpo, kDpoPl, kRrhf, kLire, kNumLosses };
enum StrategyCode : int { kErm = 0, kReweight, kDro, kDora, kDrdpo, kNumStrategies };

// Loss parameters in LossSpec.param_names order (encode_params), passed by value to kernels.
struct LossParams {
  double value[kMaxLossParams];
};

// Every dispatch on a loss or strategy code below names each code in its own `case`; its `default:` is
// an error path. It is unreachable: csrc/bindings.cpp rejects codes outside [0, kNumLosses) and
// [0, kNumStrategies) before any kernel runs. These functions also run on the device, where nothing can
// throw, so a code that slips through (say, an enum value added without its cases) yields NaN for the
// loss, the weights and the gradients: no reduction can hide it.
template <typename T>
DORA_HD T invalid_code_value() { return static_cast<T>(NAN); }

// LossSpec.param_names of each loss; -1 (matches no parameter list) for a code that is not a loss.
DORA_HD int loss_param_count(int code) {
  switch (code) {
    case kDpo: case kDpoPl: case kRrhf: return 1;
    case kRdpo: case kIpo: case kRobustDpo: case kExo: case kSimpo: case kLire: return 2;
    default: return -1;
  }
}

// LossSpec.needs_reference of each loss.
DORA_HD bool loss_needs_reference(int code) {
  switch (code) {
    case kDpo: case kRdpo: case kIpo: case kRobustDpo: case kExo: case kDpoPl: return true;
    case kSimpo: case kRrhf: case kLire: return false;
    default: return false;
  }
}

// ------------------------------------------------------------------------------------------------
// Scalar helpers (float and double overloads, host and device)
// ------------------------------------------------------------------------------------------------

DORA_HD float exp_(float x) { return expf(x); }
DORA_HD double exp_(double x) { return exp(x); }
DORA_HD float log_(float x) { return logf(x); }
DORA_HD double log_(double x) { return log(x); }
DORA_HD float log1p_(float x) { return log1pf(x); }
DORA_HD double log1p_(double x) { return log1p(x); }
DORA_HD float expm1_(float x) { return expm1f(x); }
DORA_HD double expm1_(double x) { return expm1(x); }
DORA_HD float sqrt_(float x) { return sqrtf(x); }
DORA_HD double sqrt_(double x) { return sqrt(x); }

template <typename T>
DORA_HD T negative_infinity() { return -static_cast<T>(INFINITY); }

// max that propagates NaN (a NaN loss must reach the caller, never be hidden)
template <typename T>
DORA_HD T max_nan(T a, T b) { return (a > b || a != a) ? a : b; }

// log σ(x) = min(x, 0) − log1p(exp(−|x|)), stable for every x.
template <typename T>
DORA_HD T log_sigmoid(T x) { return (x < T(0) ? x : T(0)) - log1p_(exp_(x < T(0) ? x : -x)); }

template <typename T>
DORA_HD T sigmoid(T x) {
  if (x >= T(0)) return T(1) / (T(1) + exp_(-x));
  T e = exp_(x);
  return e / (T(1) + e);
}

// ------------------------------------------------------------------------------------------------
// Row passes (section 5.3 (1) and (3)): the per-value rules shared by the CPU and CUDA row kernels
// ------------------------------------------------------------------------------------------------

DORA_HD float fmax_(float a, float b) { return fmaxf(a, b); }
DORA_HD double fmax_(double a, double b) { return fmax(a, b); }

// The reference a row pass takes its exponentials against: the unevaluated sum m + lo of a value m of the
// row (its maximum, exact at any magnitude) and a small lo in the units of the exponential (0 in the
// forward; the backward's log s, the sum's log, converted to the units). The exponent of a value x is
// (x − m)·k − lo, k the units' scale: the difference first, exact whenever x is within a factor 2 of m, so
// the exponent keeps its digits however large m is (m·k rounded alone is off by up to half its ulp, 512
// at |m| = 1e10, a factor up to 2^512 in every term; m + log s rounded, by a factor up to e^(ulp/2)).
template <typename T>
struct Shift {
  T hi, lo;
};

// The units of a row pass's exponential: shift_of(m) is a reference in them, shift_of(m, log_s) the
// reference m + log_s (log_s natural: the backward's normaliser), exp_from(x, shift) the exponential of x
// against a reference, log(s) the natural log of a sum of such exponentials.
// Natural units (k = 1): e^((x − m) − lo). (The CUDA fp32 kernels use base 2, k = log2 e, instead.)
struct NaturalUnits {
  template <typename T>
  DORA_HD Shift<T> shift_of(T m) const { return {m, T(0)}; }
  template <typename T>
  DORA_HD Shift<T> shift_of(T m, T log_s) const { return {m, log_s}; }
  template <typename T>
  DORA_HD T exp_from(T x, Shift<T> shift) const { return exp_((x - shift.hi) - shift.lo); }
  template <typename T>
  DORA_HD T log(T s) const { return log_(s); }
};

// A running log-sum-exp over a row: m is the largest value seen (as given), s = Σ exp_from(u, shift_of(m))
// over the values u seen, in the caller's `units` (see NaturalUnits): the exponential of the row's maximum
// counts 1, so s never overflows, whatever the magnitude of the values. NaN never enters m (fmax skips it)
// but always enters s, so a NaN anywhere in a row makes its log-sum-exp NaN whichever thread, chunk or
// block meets it first; while m = −∞ (nothing finite seen yet) no ∞ − ∞ is formed. +∞ gives NaN too
// (∞ − ∞ inside the exponential). Start from {−∞, 0}.
template <typename T>
struct OnlineLse {
  T m;
  T s;

  // Moves the reference to max(m, vmax) before values whose maximum is vmax are added.
  DORA_HD_TEMPLATE_CALLS_DEVICE
  template <typename Units>
  DORA_HD void raise_to(T vmax, const Units& units) {
    const T next = fmax_(m, vmax);
    s = next == m ? s : s * units.exp_from(m, units.shift_of(next));  // from m = −∞: exp(−∞) = 0
    m = next;
  }

  // The reference to take exponentials against: shift_of(m), or of 0 while m = −∞ (every value seen is
  // then −∞ or NaN, so the exponential of a value against 0 is 0 or NaN as it should be).
  DORA_HD_TEMPLATE_CALLS_DEVICE
  template <typename Units>
  DORA_HD Shift<T> shift(const Units& units) const {
    return units.shift_of(m == negative_infinity<T>() ? T(0) : m);
  }

  // Folds in another running pair (m2, s2) over other values of the same row.
  DORA_HD_TEMPLATE_CALLS_DEVICE
  template <typename Units>
  DORA_HD void merge(T m2, T s2, const Units& units) {
    const T next = fmax_(m, m2);
    const Shift<T> to = units.shift_of(next);
    s = (m == next ? s : s * units.exp_from(m, to)) + (m2 == next ? s2 : s2 * units.exp_from(m2, to));
    m = next;
  }

  // The log-probability of the value z among the row's values, (z − m) − log s: differences first, so that
  // it keeps its digits at any magnitude of the row (z − lse would lose up to half an ulp of lse).
  DORA_HD_TEMPLATE_CALLS_DEVICE
  template <typename Units>
  DORA_HD T log_prob(T z, const Units& units) const { return (z - m) - units.log(s); }
};

// A token row's log-sum-exp as the forward saves it for the backward: the unevaluated sum m + log_s of the
// row's maximum m, exact (it is one of the row's values, and bf16/fp16/fp32 values are fp32 values) and the
// natural log of s = Σ e^(z − m) ∈ [1, V], which keeps its relative precision. So the backward's
// p = e^((z − m) − log_s) is the softmax to the accumulation dtype's rounding at any magnitude of the row:
// a single rounded m + log s would put a factor up to e^(spacing(lse)/2) on every p (1 ± 5e-4 at |lse| = 1e4
// in fp32, beyond e^500 at 1e10). Stored as two consecutive values per token: lse (N, T, 2).
template <typename T>
struct RowNormaliser {
  T m, log_s;

  DORA_HD_TEMPLATE_CALLS_DEVICE
  template <typename Units>
  DORA_HD static RowNormaliser of(const OnlineLse<T>& state, const Units& units) {
    return {state.m, units.log(state.s)};
  }
  DORA_HD static RowNormaliser load(const T* lse, int64_t r) { return {lse[2 * r], lse[2 * r + 1]}; }
  DORA_HD void store(T* lse, int64_t r) const {
    lse[2 * r] = m;
    lse[2 * r + 1] = log_s;
  }

  // The reference to take the backward's exponentials against: p = units.exp_from(z, shift(units)).
  DORA_HD_TEMPLATE_CALLS_DEVICE
  template <typename Units>
  DORA_HD Shift<T> shift(const Units& units) const { return units.shift_of(m, log_s); }

  // The label's entry of the backward row pass, g·(1 − p_y) with p_y = exp((z_y − m) − log_s), formed as
  // −g·expm1((z_y − m) − log_s) so that it keeps its precision as p_y → 1.
  DORA_HD T label_gradient(T g, T z_y) const { return -g * expm1_((z_y - m) - log_s); }
};

// An unchecked label outside [0, V) that is not ignore_index (validate=False) gives its row a NaN
// log-sum-exp, hence a NaN token log-prob and S, and a NaN gradient row; nothing outside the row is read.
DORA_HD bool label_in_vocabulary(int64_t label, int64_t V) { return label >= 0 && label < V; }

// ------------------------------------------------------------------------------------------------
// Stage (2a): one prompt's loss ℓ_b and gradient ∂ℓ_b/∂S_k (section 4 table)
// ------------------------------------------------------------------------------------------------

// One prompt's K responses: S, L, scores and (optionally) S_ref, each K contiguous values.
template <typename T>
struct Prompt {
  int K;
  const T* S;
  const T* L;
  const T* S_ref;  // nullptr when the loss has no reference
  const T* scores;

  DORA_HD T rho(int k) const { return S_ref ? S[k] - S_ref[k] : S[k]; }
  DORA_HD T length(int k) const { return L[k] > T(1) ? L[k] : T(1); }  // max(L, 1)
  DORA_HD T avg(int k) const { return S[k] / length(k); }
};

// order[0..K): response indices by score descending, ties by list order (a stable insertion sort).
template <typename T>
DORA_HD void score_order(int K, const T* scores, int* order) {
  for (int i = 0; i < K; ++i) {
    int j = i;
    while (j > 0 && scores[order[j - 1]] < scores[i]) {
      order[j] = order[j - 1];
      --j;
    }
    order[j] = i;
  }
}

// −log σ(z) and d/dz of it for z = β(ρ_c − ρ_r) (+ offset): the shared pairwise logistic form.
template <typename T>
DORA_HD T pairwise_logistic(T z, T* dz) {
  *dz = -sigmoid(-z);
  return -log_sigmoid(z);
}

template <typename T>
DORA_HD T loss_pairwise(int code, const T* prm, const Prompt<T>& p, int c, int r, T* grad) {
  const T beta = prm[0];
  const T h = p.rho(c) - p.rho(r);
  T ell, dh;  // ℓ and ∂ℓ/∂h; then ∂S_c = dh, ∂S_r = −dh
  switch (code) {
    case kDpo: {
      T dz;
      ell = pairwise_logistic(beta * h, &dz);
      dh = beta * dz;
      break;
    }
    case kRdpo: {
      T dz;
      ell = pairwise_logistic(beta * h + prm[1] * (p.L[c] - p.L[r]), &dz);
      dh = beta * dz;
      break;
    }
    case kRobustDpo: {
      // ((1−ε)(−log σ(z)) − ε(−log σ(−z))) / (1 − 2ε); d/dz = (−(1−ε)σ(−z) − ε σ(z)) / (1 − 2ε)
      const T eps = prm[1], z = beta * h, denom = T(1) - T(2) * eps;
      ell = ((T(1) - eps) * -log_sigmoid(z) - eps * -log_sigmoid(-z)) / denom;
      dh = beta * (-(T(1) - eps) * sigmoid(-z) - eps * sigmoid(z)) / denom;
      break;
    }
    case kExo: {  // Σ_i p_i (log p_i − log t_i), p = softmax(β ρ_c, β ρ_r), t = (1 − ε, ε)
      const T eps = prm[1];
      const T u = beta * h;  // u_c − u_r
      const T lpc = log_sigmoid(u), lpr = log_sigmoid(-u), pc = sigmoid(u), pr = sigmoid(-u);
      const T log_tc = log1p_(-eps), log_tr = log_(eps);
      ell = pc * (lpc - log_tc) + pr * (lpr - log_tr);
      // ∂ℓ/∂u_c = p_c (a_c − ℓ) = p_c p_r (a_c − a_r) with a_c − a_r = u − log(t_c / t_r): no cancellation
      dh = beta * pc * pr * (u - (log_tc - log_tr));
      break;
    }
    default:  // not a pairwise loss (unreachable, see invalid_code_value)
      ell = dh = invalid_code_value<T>();
      break;
  }
  grad[c] += dh;
  grad[r] -= dh;
  return ell;
}

// IPO: (ρ_c − ρ_r − 1/(2β))², or with length_normalize (prm[1] = 1, TRL's convention) each log-ratio
// divided by its response's token count max(L, 1) first.
template <typename T>
DORA_HD T loss_ipo(const T* prm, const Prompt<T>& p, int c, int r, T* grad) {
  const bool per_token = prm[1] > T(0.5);
  const T sc = per_token ? T(1) / p.length(c) : T(1), sr = per_token ? T(1) / p.length(r) : T(1);
  const T d = p.rho(c) * sc - p.rho(r) * sr - T(1) / (T(2) * prm[0]);
  grad[c] += T(2) * d * sc;
  grad[r] -= T(2) * d * sr;
  return d * d;
}

template <typename T>
DORA_HD T loss_simpo(const T* prm, const Prompt<T>& p, int c, int r, T* grad) {
  const T beta = prm[0], gamma = prm[1];
  T dz;
  const T ell = pairwise_logistic(beta * (p.avg(c) - p.avg(r)) - gamma, &dz);
  grad[c] += beta * dz / p.length(c);
  grad[r] -= beta * dz / p.length(r);
  return ell;
}

// Plackett-Luce: u_k = β ρ_τ(k), ℓ = −Σ_{k<K−1} (u_k − lse_{j≥k} u_j);
// ∂ℓ/∂u_j = −[j < K−1] + Σ_{k ≤ min(j, K−2)} exp(u_j − lse_k).
template <typename T>
DORA_HD T loss_dpo_pl(const T* prm, const Prompt<T>& p, const int* order, T* grad) {
  const int K = p.K;
  const T beta = prm[0];
  T u[kMaxResponses] = {}, suffix[kMaxResponses] = {};
  for (int k = 0; k < K; ++k) u[k] = beta * p.rho(order[k]);
  suffix[K - 1] = u[K - 1];
  for (int k = K - 2; k >= 0; --k) {
    const T m = u[k] > suffix[k + 1] ? u[k] : suffix[k + 1];
    suffix[k] = m + log_(exp_(u[k] - m) + exp_(suffix[k + 1] - m));
  }
  T ell = T(0);
  for (int k = 0; k + 1 < K; ++k) ell -= u[k] - suffix[k];
  for (int j = 0; j < K; ++j) {
    T du = j + 1 < K ? T(-1) : T(0);
    const int last = j < K - 2 ? j : K - 2;
    for (int k = 0; k <= last; ++k) du += exp_(u[j] - suffix[k]);
    grad[order[j]] += beta * du;
  }
  return ell;
}

// RRHF: Σ_{score_i < score_j} max(0, A_i − A_j) − α_sft A_best (relu'(0) = 0, as in PyTorch).
template <typename T>
DORA_HD T loss_rrhf(const T* prm, const Prompt<T>& p, int best, T* grad) {
  T ell = T(0);
  T da[kMaxResponses];
  for (int i = 0; i < p.K; ++i) da[i] = T(0);
  for (int i = 0; i < p.K; ++i) {
    for (int j = 0; j < p.K; ++j) {
      const T gap = p.avg(i) - p.avg(j);
      if (p.scores[i] < p.scores[j] && gap > T(0)) {
        ell += gap;
        da[i] += T(1);
        da[j] -= T(1);
      }
    }
  }
  ell -= prm[0] * p.avg(best);
  da[best] -= prm[0];
  for (int i = 0; i < p.K; ++i) grad[i] += da[i] / p.length(i);
  return ell;
}

// softmax(x / temperature) over K values.
template <typename T>
DORA_HD void softmax(int K, const T* x, T temperature, T* out) {
  T m = negative_infinity<T>();
  for (int k = 0; k < K; ++k) m = max_nan(m, x[k] / temperature);
  T total = T(0);
  for (int k = 0; k < K; ++k) {
    out[k] = exp_(x[k] / temperature - m);
    total += out[k];
  }
  for (int k = 0; k < K; ++k) out[k] /= total;
}

// LiRE: max_k R_k − Σ_k P_k R_k, P = softmax(S/T); ∂ℓ/∂S_j = −P_j (R_j − Σ P R) / T.
// R = softmax(scores) (reward_norm 0) or the per-prompt z-score with population std (1; all-equal → 0).
template <typename T>
DORA_HD T loss_lire(const T* prm, const Prompt<T>& p, T* grad) {
  const int K = p.K;
  const T temperature = prm[0];
  const bool zscore = prm[1] > T(0.5);
  T R[kMaxResponses] = {}, P[kMaxResponses] = {};
  if (zscore) {
    T mean = T(0);
    for (int k = 0; k < K; ++k) mean += p.scores[k];
    mean /= T(K);
    T var = T(0);
    for (int k = 0; k < K; ++k) var += (p.scores[k] - mean) * (p.scores[k] - mean);
    const T sd = sqrt_(var / T(K));
    for (int k = 0; k < K; ++k) R[k] = sd > T(0) ? (p.scores[k] - mean) / sd : T(0);
  } else {
    softmax(K, p.scores, T(1), R);
  }
  softmax(K, p.S, temperature, P);
  T expected = T(0), best = R[0];
  for (int k = 0; k < K; ++k) {
    expected += P[k] * R[k];
    best = max_nan(best, R[k]);
  }
  for (int k = 0; k < K; ++k) grad[k] += -P[k] * (R[k] - expected) / temperature;
  return best - expected;
}

// ℓ_b of loss `code` for one prompt; writes ∂ℓ_b/∂S_k into grad[0..K).
template <typename T>
DORA_HD T prompt_loss(int code, const T* prm, const Prompt<T>& p, T* grad) {
  int order[kMaxResponses] = {};
  score_order(p.K, p.scores, order);
  for (int k = 0; k < p.K; ++k) grad[k] = T(0);
  const int best = order[0], worst = order[p.K - 1];
  switch (code) {
    case kDpo: case kRdpo: case kRobustDpo: case kExo:
      return loss_pairwise(code, prm, p, best, worst, grad);
    case kIpo: return loss_ipo(prm, p, best, worst, grad);
    case kSimpo: return loss_simpo(prm, p, best, worst, grad);
    case kDpoPl: return loss_dpo_pl(prm, p, order, grad);
    case kRrhf: return loss_rrhf(prm, p, best, grad);
    case kLire: return loss_lire(prm, p, grad);
    default:  // not a loss (unreachable, see invalid_code_value)
      for (int k = 0; k < p.K; ++k) grad[k] = invalid_code_value<T>();
      return invalid_code_value<T>();
  }
}

// ------------------------------------------------------------------------------------------------
// Stage (2b): the robust reduction over prompts (section 4, strategies table)
// ------------------------------------------------------------------------------------------------
//
// With s_b the strategy's per-prompt value (erm ℓ, reweight h̃ℓ, dro ℓ, dora h̃ℓ, drdpo −ℓ):
//   linear (erm, reweight): ℒ = mean(s)
//   exponential (dro, dora, drdpo): ℒ = ±(m + λ log1p(mean expm1((s − m)/λ))), m = max s,
//   weights softmax(s/λ); drdpo takes the minus sign.

DORA_HD bool strategy_is_exponential(int code) {
  switch (code) {
    case kDro: case kDora: case kDrdpo: return true;
    case kErm: case kReweight: return false;
    default: return false;  // an invalid code then meets the NaN of strategy_value
  }
}

// s_b, the value the strategy reduces over prompts.
template <typename T>
DORA_HD T strategy_value(int code, T ell, T h) {
  switch (code) {
    case kErm: case kDro: return ell;
    case kReweight: case kDora: return h * ell;
    case kDrdpo: return -ell;
    default: return invalid_code_value<T>();  // unreachable, see invalid_code_value
  }
}

// The weight w_b of a linear strategy (erm, reweight); exponential ones take softmax(s/λ).
template <typename T>
DORA_HD T linear_weight(int code, T h, T sum_h, int B) {
  switch (code) {
    case kErm: return T(1) / T(B);
    case kReweight: return h / sum_h;
    default: return invalid_code_value<T>();  // unreachable, see invalid_code_value
  }
}

// ∂ℒ/∂ℓ_b from the prompt's weight w_b (section 4 table).
template <typename T>
DORA_HD T strategy_dloss_dell(int code, T weight, T h, int B) {
  switch (code) {
    case kErm: return T(1) / T(B);
    case kReweight: return h / T(B);
    case kDora: return h * weight;
    case kDro: case kDrdpo: return weight;
    default: return invalid_code_value<T>();  // unreachable, see invalid_code_value
  }
}

template <typename T>
DORA_HD T h_at(const T* h, int b) { return h ? h[b] : T(1); }

// ℒ, weights (B,) and, when dloss_dell is not null, ∂ℒ/∂ℓ (B,) of strategy `code`.
DORA_HD_TEMPLATE_CALLS_DEVICE
template <typename T, typename Block>
DORA_HD void robust_reduce(int code, T lam, int B, const T* ell, const T* h, Block& block, T* loss, T* weights,
                           T* dloss_dell) {
  const bool exponential = strategy_is_exponential(code);
  T local_max = negative_infinity<T>(), local_h = T(0);
  for (int b = block.rank(); b < B; b += block.size()) {
    local_max = max_nan(local_max, strategy_value(code, ell[b], h_at(h, b)));
    local_h += h_at(h, b);
  }
  const T m = block.max(local_max);
  const T sum_h = block.sum(local_h);
  T local_terms = T(0), local_exp = T(0);
  for (int b = block.rank(); b < B; b += block.size()) {
    const T s = strategy_value(code, ell[b], h_at(h, b));
    local_terms += exponential ? expm1_((s - m) / lam) : s;
    local_exp += exponential ? exp_((s - m) / lam) : T(0);
  }
  const T terms = block.sum(local_terms);
  const T exp_total = block.sum(local_exp);
  for (int b = block.rank(); b < B; b += block.size()) {
    const T hb = h_at(h, b);
    T w;
    if (exponential) w = exp_((strategy_value(code, ell[b], hb) - m) / lam) / exp_total;
    else w = linear_weight(code, hb, sum_h, B);
    weights[b] = w;
    if (dloss_dell) dloss_dell[b] = strategy_dloss_dell(code, w, hb, B);
  }
  if (block.rank() == 0) {
    if (!exponential) {
      *loss = terms / T(B);
    } else {
      const T value = m + lam * log1p_(terms / T(B));
      *loss = code == kDrdpo ? -value : value;
    }
  }
}

// Stage (2a) for every prompt: ℓ (B,) and ∂ℓ_b/∂S_n (N = B·K,), prompts strided over the block.
DORA_HD_TEMPLATE_CALLS_DEVICE
template <typename T, typename Block>
DORA_HD void prompt_losses(int code, const T* prm, int B, int K, const T* S, const T* L, const T* S_ref,
                           const T* scores, Block& block, T* ell, T* dell_dS) {
  for (int b = block.rank(); b < B; b += block.size()) {
    const int64_t row = static_cast<int64_t>(b) * K;
    const Prompt<T> p{K, S + row, L + row, S_ref ? S_ref + row : nullptr, scores + row};
    ell[b] = prompt_loss(code, prm, p, dell_dS + row);
  }
}

// The whole per-batch stage: ℓ, then the strategy, then gS[n] = ∂ℒ/∂ℓ_b · ∂ℓ_b/∂S_n, the coefficient
// of the backward row pass. dell_dS (N,) is scratch; gS may alias it.
DORA_HD_TEMPLATE_CALLS_DEVICE
template <typename T, typename Block>
DORA_HD void batch_stage(int loss_code, const T* prm, int strategy_code, T lam, int B, int K, const T* S,
                         const T* L, const T* S_ref, const T* scores, const T* h, Block& block, T* ell,
                         T* dell_dS, T* loss, T* weights, T* gS) {
  prompt_losses(loss_code, prm, B, K, S, L, S_ref, scores, block, ell, dell_dS);
  block.sync();
  robust_reduce(strategy_code, lam, B, ell, h, block, loss, weights, static_cast<T*>(nullptr));
  block.sync();
  for (int64_t n = block.rank(); n < static_cast<int64_t>(B) * K; n += block.size()) {
    const int b = static_cast<int>(n / K);
    gS[n] = strategy_dloss_dell(strategy_code, weights[b], h_at(h, b), B) * dell_dS[n];
  }
}

// The Block policy of a single host thread: the reductions are the identity.
template <typename T>
struct SerialBlock {
  int rank() const { return 0; }
  int size() const { return 1; }
  T sum(T x) const { return x; }
  T max(T x) const { return x; }
  void sync() const {}
};

}  // namespace dora
