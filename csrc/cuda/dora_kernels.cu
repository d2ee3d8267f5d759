// CUDA kernels of the DoRA op (DESIGN.md section 5). Plain CUDA C++: no torch header.
//
// Row passes: one thread block per token row. Each thread keeps an online (max m, Σ exp(z − m)) over
// 16-byte packs of the row (4 fp32, 8 bf16/fp16 or 2 fp64 values), folding a pack's maximum in once so
// that a pack costs one exponential per value; the row's unaligned head and its tail go value by value.
// Ignored tokens skip the vocabulary entirely. Per-sequence sums S, L are a second, deterministic
// reduction over the token log-probs (no atomics). The per-batch stage is one block running the
// shared code of dora_math.h.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "dora_cuda.h"
#include "dora_math.h"

namespace dora {
namespace cuda {
namespace {

constexpr int kRowThreads = 256;
constexpr int kStageThreads = 256;
constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;

template <typename scalar_t>
struct Traits {
  using acc_t = float;
};
template <>
struct Traits<double> {
  using acc_t = double;
};

__device__ __forceinline__ float widen(float x) { return x; }
__device__ __forceinline__ double widen(double x) { return x; }
__device__ __forceinline__ float widen(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float widen(__half x) { return __half2float(x); }

template <typename scalar_t>
__device__ __forceinline__ scalar_t narrow(typename Traits<scalar_t>::acc_t x);
template <>
__device__ __forceinline__ float narrow<float>(float x) { return x; }
template <>
__device__ __forceinline__ double narrow<double>(double x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 narrow<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
template <>
__device__ __forceinline__ __half narrow<__half>(float x) { return __float2half(x); }

__device__ __forceinline__ float fast_exp(float x) { return __expf(x); }
__device__ __forceinline__ double fast_exp(double x) { return exp(x); }

template <typename scalar_t>
struct alignas(16) Pack {
  static constexpr int kWidth = 16 / sizeof(scalar_t);
  scalar_t v[kWidth];
};

// A row as [head: value by value][packs: 16-byte aligned][tail]. Rows whose address is not a multiple
// of the element size (never for tensors PyTorch allocates) take the scalar path throughout.
struct RowLayout {
  int64_t head, packs;
};

template <typename scalar_t>
__device__ __forceinline__ RowLayout row_layout(const void* row, int64_t V) {
  constexpr int64_t W = Pack<scalar_t>::kWidth;
  const uintptr_t addr = reinterpret_cast<uintptr_t>(row);
  if (addr % sizeof(scalar_t) != 0) return {V, 0};
  const int64_t offset = static_cast<int64_t>((addr % 16) / sizeof(scalar_t));
  const int64_t head = offset == 0 ? 0 : (W - offset < V ? W - offset : V);
  return {head, (V - head) / W};
}

// Online log-sum-exp state of one thread.
template <typename acc_t>
struct OnlineLse {
  acc_t m = negative_infinity<acc_t>();
  acc_t s = acc_t(0);

  // Folds in values whose maximum is `vmax`, the sum of exp(x − m) taken by `sum_at(m)`.
  template <typename SumAt>
  __device__ __forceinline__ void add(acc_t vmax, SumAt sum_at) {
    if (vmax > m) {
      s *= fast_exp(m - vmax);
      m = vmax;
    }
    if (m != negative_infinity<acc_t>()) s += sum_at(m);
  }

  __device__ __forceinline__ void merge(acc_t m2, acc_t s2) {
    const acc_t mx = m > m2 ? m : m2;
    if (mx == negative_infinity<acc_t>()) return;
    s = s * fast_exp(m - mx) + s2 * fast_exp(m2 - mx);
    m = mx;
  }
};

template <typename T>
__device__ __forceinline__ T shfl_xor(T x, int lane_mask) {
  return __shfl_xor_sync(kFullMask, x, lane_mask);
}

// All threads of the block get the reduction of `x` by `op`; `shared` holds one value per warp.
template <typename T, typename Op>
__device__ T block_all_reduce(T x, T identity, T* shared, Op op) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) x = op(x, shfl_xor(x, offset));
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int warps = (blockDim.x + kWarp - 1) / kWarp;
  __syncthreads();  // the previous call's readers are done with `shared`
  if (lane == 0) shared[warp] = x;
  __syncthreads();
  x = lane < warps ? shared[lane] : identity;
  for (int offset = kWarp / 2; offset > 0; offset /= 2) x = op(x, shfl_xor(x, offset));
  return x;
}

struct SumOp {
  template <typename T>
  __device__ T operator()(T a, T b) const { return a + b; }
};
struct MaxOp {
  template <typename T>
  __device__ T operator()(T a, T b) const { return max_nan(a, b); }
};

template <typename scalar_t>
__global__ void __launch_bounds__(kRowThreads)
    forward_rows(const scalar_t* __restrict__ z, const int64_t* __restrict__ labels, int64_t V, int64_t ignore_index,
                 typename Traits<scalar_t>::acc_t* __restrict__ lse, typename Traits<scalar_t>::acc_t* __restrict__ lp) {
  using acc_t = typename Traits<scalar_t>::acc_t;
  constexpr int W = Pack<scalar_t>::kWidth;
  const int64_t r = blockIdx.x;
  const int64_t label = labels[r];
  if (label == ignore_index || label < 0 || label >= V) {
    if (threadIdx.x == 0) {
      const acc_t value = label == ignore_index ? acc_t(0) : acc_t(NAN);
      lse[r] = value;
      lp[r] = value;
    }
    return;
  }
  const scalar_t* row = z + r * V;
  const RowLayout layout = row_layout<scalar_t>(row, V);
  OnlineLse<acc_t> state;
  auto add_one = [&](acc_t x) { state.add(x, [x](acc_t m) { return fast_exp(x - m); }); };
  for (int64_t i = threadIdx.x; i < layout.head; i += blockDim.x) add_one(widen(row[i]));
  const Pack<scalar_t>* packs = reinterpret_cast<const Pack<scalar_t>*>(row + layout.head);
  // Unrolled so that several 16-byte loads per thread are in flight (the updates only chain the sums).
#pragma unroll 4
  for (int64_t p = threadIdx.x; p < layout.packs; p += blockDim.x) {
    const Pack<scalar_t> pack = packs[p];
    acc_t x[W];
    acc_t vmax = negative_infinity<acc_t>();
#pragma unroll
    for (int j = 0; j < W; ++j) {
      x[j] = widen(pack.v[j]);
      vmax = x[j] > vmax ? x[j] : vmax;
    }
    state.add(vmax, [&x](acc_t m) {
      acc_t total = acc_t(0);
#pragma unroll
      for (int j = 0; j < W; ++j) total += fast_exp(x[j] - m);
      return total;
    });
  }
  for (int64_t i = layout.head + layout.packs * W + threadIdx.x; i < V; i += blockDim.x) add_one(widen(row[i]));

  for (int offset = kWarp / 2; offset > 0; offset /= 2) state.merge(shfl_xor(state.m, offset), shfl_xor(state.s, offset));
  __shared__ acc_t shared_m[kRowThreads / kWarp], shared_s[kRowThreads / kWarp];
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  if (lane == 0) {
    shared_m[warp] = state.m;
    shared_s[warp] = state.s;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    OnlineLse<acc_t> total;
    for (int w = 0; w < static_cast<int>(blockDim.x / kWarp); ++w) total.merge(shared_m[w], shared_s[w]);
    const acc_t row_lse = total.m + log_(total.s);
    lse[r] = row_lse;
    lp[r] = widen(row[label]) - row_lse;
  }
}

// S[n] = Σ_t lp[n, t], L[n] = #{t: labels[n, t] ≠ ignore_index}; one block per sequence.
template <typename acc_t>
__global__ void __launch_bounds__(kRowThreads)
    sequence_sums(const acc_t* __restrict__ lp, const int64_t* __restrict__ labels, int64_t T, int64_t ignore_index,
                  acc_t* __restrict__ S, acc_t* __restrict__ L) {
  __shared__ acc_t shared[kRowThreads / kWarp];
  const int64_t n = blockIdx.x;
  acc_t total = acc_t(0), count = acc_t(0);
  for (int64_t t = threadIdx.x; t < T; t += blockDim.x) {
    total += lp[n * T + t];
    count += labels[n * T + t] != ignore_index ? acc_t(1) : acc_t(0);
  }
  total = block_all_reduce(total, acc_t(0), shared, SumOp{});
  count = block_all_reduce(count, acc_t(0), shared, SumOp{});
  if (threadIdx.x == 0) {
    S[n] = total;
    L[n] = count;
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kRowThreads)
    backward_rows(const scalar_t* z, scalar_t* grad, const int64_t* __restrict__ labels,
                  const typename Traits<scalar_t>::acc_t* __restrict__ lse,
                  const typename Traits<scalar_t>::acc_t* __restrict__ gS, int64_t T, int64_t V, int64_t ignore_index) {
  using acc_t = typename Traits<scalar_t>::acc_t;
  constexpr int W = Pack<scalar_t>::kWidth;
  const int64_t r = blockIdx.x;
  const int64_t label = labels[r];
  const scalar_t* row = z + r * V;
  scalar_t* out = grad + r * V;
  if (label == ignore_index || label < 0 || label >= V) {  // a zero row, without reading the logits
    const RowLayout layout = row_layout<scalar_t>(out, V);
    Pack<scalar_t> zeros;
#pragma unroll
    for (int j = 0; j < W; ++j) zeros.v[j] = narrow<scalar_t>(acc_t(0));
    for (int64_t i = threadIdx.x; i < layout.head; i += blockDim.x) out[i] = zeros.v[0];
    Pack<scalar_t>* out_packs = reinterpret_cast<Pack<scalar_t>*>(out + layout.head);
    for (int64_t p = threadIdx.x; p < layout.packs; p += blockDim.x) out_packs[p] = zeros;
    for (int64_t i = layout.head + layout.packs * W + threadIdx.x; i < V; i += blockDim.x) out[i] = zeros.v[0];
    return;
  }
  const acc_t g = gS[r / T], shift = lse[r];
  // dz_v = g·([v = y] − p_v), the target value g·(1 − p_y) formed in acc_t before the cast.
  auto value = [&](int64_t v, acc_t x) -> acc_t {
    const acc_t p = fast_exp(x - shift);
    return v == label ? g * (acc_t(1) - p) : -g * p;
  };
  RowLayout layout = row_layout<scalar_t>(row, V);
  if (row_layout<scalar_t>(out, V).head != layout.head) layout = {V, 0};  // input and output packs must align
  for (int64_t i = threadIdx.x; i < layout.head; i += blockDim.x) out[i] = narrow<scalar_t>(value(i, widen(row[i])));
  const Pack<scalar_t>* in_packs = reinterpret_cast<const Pack<scalar_t>*>(row + layout.head);
  Pack<scalar_t>* out_packs = reinterpret_cast<Pack<scalar_t>*>(out + layout.head);
#pragma unroll 4
  for (int64_t p = threadIdx.x; p < layout.packs; p += blockDim.x) {
    const Pack<scalar_t> pack = in_packs[p];
    Pack<scalar_t> result;
    const int64_t base = layout.head + p * W;
#pragma unroll
    for (int j = 0; j < W; ++j) result.v[j] = narrow<scalar_t>(value(base + j, widen(pack.v[j])));
    out_packs[p] = result;
  }
  for (int64_t i = layout.head + layout.packs * W + threadIdx.x; i < V; i += blockDim.x) {
    out[i] = narrow<scalar_t>(value(i, widen(row[i])));
  }
}

// The Block policy of dora_math.h for one CUDA thread block.
template <typename T>
struct ThreadBlock {
  T* shared;
  __device__ int rank() const { return threadIdx.x; }
  __device__ int size() const { return blockDim.x; }
  __device__ void sync() const { __syncthreads(); }
  __device__ T sum(T x) const { return block_all_reduce(x, T(0), shared, SumOp{}); }
  __device__ T max(T x) const { return block_all_reduce(x, negative_infinity<T>(), shared, MaxOp{}); }
};

template <typename T>
struct StageParams {
  T value[kMaxLossParams];
  __device__ explicit StageParams(const LossParams& p) {
    for (int i = 0; i < kMaxLossParams; ++i) value[i] = static_cast<T>(p.value[i]);
  }
};

template <typename T>
__global__ void __launch_bounds__(kStageThreads)
    prompt_loss_kernel(StageArgs a, const T* S, const T* L, const T* S_ref, const T* scores, T* ell, T* dell_dS) {
  __shared__ T shared[kStageThreads / kWarp];
  ThreadBlock<T> block{shared};
  const StageParams<T> prm(a.params);
  ::dora::prompt_losses<T>(a.loss_code, prm.value, a.B, a.K, S, L, S_ref, scores, block, ell, dell_dS);
}

template <typename T>
__global__ void __launch_bounds__(kStageThreads)
    robust_reduce_kernel(StageArgs a, const T* ell, const T* h, T* loss, T* weights, T* dloss_dell) {
  __shared__ T shared[kStageThreads / kWarp];
  ThreadBlock<T> block{shared};
  ::dora::robust_reduce<T>(a.strategy_code, static_cast<T>(a.lam), a.B, ell, h, block, loss, weights, dloss_dell);
}

template <typename T>
__global__ void __launch_bounds__(kStageThreads)
    batch_stage_kernel(StageArgs a, const T* S, const T* L, const T* S_ref, const T* scores, const T* h, T* ell,
                       T* loss, T* weights, T* gS) {
  __shared__ T shared[kStageThreads / kWarp];
  ThreadBlock<T> block{shared};
  const StageParams<T> prm(a.params);
  // gS doubles as the ∂ℓ_b/∂S scratch: batch_stage overwrites each entry with its final value in place.
  ::dora::batch_stage<T>(a.loss_code, prm.value, a.strategy_code, static_cast<T>(a.lam), a.B, a.K, S, L, S_ref, scores, h,
                         block, ell, gS, loss, weights, gS);
}

template <typename scalar_t>
cudaError_t launch_forward(const void* logits, const int64_t* labels, RowShape s, void* lse, void* lp, void* S,
                           void* L, cudaStream_t stream) {
  using acc_t = typename Traits<scalar_t>::acc_t;
  if (s.N * s.T > 0) {
    forward_rows<scalar_t><<<static_cast<unsigned>(s.N * s.T), kRowThreads, 0, stream>>>(
        static_cast<const scalar_t*>(logits), labels, s.V, s.ignore_index, static_cast<acc_t*>(lse),
        static_cast<acc_t*>(lp));
  }
  if (s.N > 0) {
    sequence_sums<acc_t><<<static_cast<unsigned>(s.N), kRowThreads, 0, stream>>>(
        static_cast<const acc_t*>(lp), labels, s.T, s.ignore_index, static_cast<acc_t*>(S), static_cast<acc_t*>(L));
  }
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t launch_backward(const void* logits, void* grad, const int64_t* labels, const void* lse, const void* gS,
                            RowShape s, cudaStream_t stream) {
  using acc_t = typename Traits<scalar_t>::acc_t;
  if (s.N * s.T > 0) {
    backward_rows<scalar_t><<<static_cast<unsigned>(s.N * s.T), kRowThreads, 0, stream>>>(
        static_cast<const scalar_t*>(logits), static_cast<scalar_t*>(grad), labels, static_cast<const acc_t*>(lse),
        static_cast<const acc_t*>(gS), s.T, s.V, s.ignore_index);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t seq_logprobs_fwd(DType dtype, const void* logits, const int64_t* labels, RowShape shape, void* lse,
                             void* lp_scratch, void* S, void* L, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32: return launch_forward<float>(logits, labels, shape, lse, lp_scratch, S, L, stream);
    case DType::kBFloat16: return launch_forward<__nv_bfloat16>(logits, labels, shape, lse, lp_scratch, S, L, stream);
    case DType::kFloat16: return launch_forward<__half>(logits, labels, shape, lse, lp_scratch, S, L, stream);
    default: return launch_forward<double>(logits, labels, shape, lse, lp_scratch, S, L, stream);
  }
}

cudaError_t seq_logprobs_bwd(DType dtype, const void* logits, void* grad, const int64_t* labels, const void* lse,
                             const void* gS, RowShape shape, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32: return launch_backward<float>(logits, grad, labels, lse, gS, shape, stream);
    case DType::kBFloat16: return launch_backward<__nv_bfloat16>(logits, grad, labels, lse, gS, shape, stream);
    case DType::kFloat16: return launch_backward<__half>(logits, grad, labels, lse, gS, shape, stream);
    default: return launch_backward<double>(logits, grad, labels, lse, gS, shape, stream);
  }
}

cudaError_t prompt_loss(bool fp64, const StageArgs& a, const void* S, const void* L, const void* S_ref,
                        const void* scores, void* ell, void* dell_dS, cudaStream_t stream) {
  if (fp64) {
    prompt_loss_kernel<double><<<1, kStageThreads, 0, stream>>>(
        a, static_cast<const double*>(S), static_cast<const double*>(L), static_cast<const double*>(S_ref),
        static_cast<const double*>(scores), static_cast<double*>(ell), static_cast<double*>(dell_dS));
  } else {
    prompt_loss_kernel<float><<<1, kStageThreads, 0, stream>>>(
        a, static_cast<const float*>(S), static_cast<const float*>(L), static_cast<const float*>(S_ref),
        static_cast<const float*>(scores), static_cast<float*>(ell), static_cast<float*>(dell_dS));
  }
  return cudaGetLastError();
}

cudaError_t robust_reduce(bool fp64, const StageArgs& a, const void* ell, const void* h, void* loss, void* weights,
                          void* dloss_dell, cudaStream_t stream) {
  if (fp64) {
    robust_reduce_kernel<double><<<1, kStageThreads, 0, stream>>>(
        a, static_cast<const double*>(ell), static_cast<const double*>(h), static_cast<double*>(loss),
        static_cast<double*>(weights), static_cast<double*>(dloss_dell));
  } else {
    robust_reduce_kernel<float><<<1, kStageThreads, 0, stream>>>(
        a, static_cast<const float*>(ell), static_cast<const float*>(h), static_cast<float*>(loss),
        static_cast<float*>(weights), static_cast<float*>(dloss_dell));
  }
  return cudaGetLastError();
}

cudaError_t batch_stage(bool fp64, const StageArgs& a, const void* S, const void* L, const void* S_ref,
                        const void* scores, const void* h, void* ell, void* loss, void* weights, void* gS,
                        cudaStream_t stream) {
  if (fp64) {
    batch_stage_kernel<double><<<1, kStageThreads, 0, stream>>>(
        a, static_cast<const double*>(S), static_cast<const double*>(L), static_cast<const double*>(S_ref),
        static_cast<const double*>(scores), static_cast<const double*>(h), static_cast<double*>(ell),
        static_cast<double*>(loss), static_cast<double*>(weights), static_cast<double*>(gS));
  } else {
    batch_stage_kernel<float><<<1, kStageThreads, 0, stream>>>(
        a, static_cast<const float*>(S), static_cast<const float*>(L), static_cast<const float*>(S_ref),
        static_cast<const float*>(scores), static_cast<const float*>(h), static_cast<float*>(ell),
        static_cast<float*>(loss), static_cast<float*>(weights), static_cast<float*>(gS));
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace dora
