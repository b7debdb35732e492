// Decode attention straight over the paged KV cache, for the CPU: one query token per row, its
// keys and values read in place from the cache blocks its block table names, never gathered
// into a new tensor. Registered as torch.ops.tokenmill.paged_decode_attention.
//
// Shapes (all contiguous):
//   q            [B, Hq, D]   float32 or bfloat16: the step's decode queries
//   k/v_cache    [N, S, Hkv, D] float32 or bfloat16: N blocks of S slots (Hq % Hkv == 0)
//   block_tables [B, W] int32: row b's position p lives in block block_tables[b][p / S]
//   starts, lens [B] int32: row b attends to positions [starts[b], lens[b]), starts < lens
//   out          [B, Hq, D]   q's dtype, written in place
// Each (row, kv head) is one task: its Hq / Hkv query heads share every key and value row read
// (grouped-query attention), and a running max and sum (online softmax, as flash attention)
// keep one block's scores at a time. Arithmetic in float32.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

// q . k over n elements, k converted to float as it is read.
template <typename T>
inline float dot(const float* q, const T* k, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += q[i] * static_cast<float>(k[i]);
  return s;
}

template <typename T>
inline void to_float(const T* src, float* dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

template <typename T, typename Q>
void decode_rows(const Q* q, const T* k_cache, const T* v_cache, const int32_t* tables,
                 const int32_t* starts, const int32_t* lens, Q* out, int64_t B, int64_t Hq,
                 int64_t Hkv, int64_t D, int64_t S, int64_t W, float scale) {
  const int64_t G = Hq / Hkv;  // query heads per kv head
  const int64_t slot_stride = Hkv * D;  // elements between consecutive slots of one block
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(G * D), acc(G * D), row(D), scores(G * S), m(G), l(G);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / Hkv, h = task % Hkv;
      for (int64_t g = 0; g < G; ++g) {
        to_float(q + (b * Hq + h * G + g) * D, &qf[g * D], D);
        for (int64_t i = 0; i < D; ++i) qf[g * D + i] *= scale;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      std::fill(m.begin(), m.end(), -std::numeric_limits<float>::infinity());
      std::fill(l.begin(), l.end(), 0.f);
      const int32_t* table = tables + b * W;
      const int64_t first = starts[b], last = lens[b];  // keys [first, last)
      for (int64_t blk = first / S; blk * S < last; ++blk) {
        const int64_t t0 = std::max(first, blk * S), t1 = std::min(last, (blk + 1) * S);
        const int64_t base = int64_t(table[blk]) * S * slot_stride + h * D;
        for (int64_t t = t0; t < t1; ++t) {  // scores [G, n] of this block's keys
          const T* k = k_cache + base + (t % S) * slot_stride;
          for (int64_t g = 0; g < G; ++g) scores[g * S + t - t0] = dot(&qf[g * D], k, D);
        }
        for (int64_t g = 0; g < G; ++g) {  // rescale what came before to the new max
          float* s = &scores[g * S];
          const float block_max = *std::max_element(s, s + (t1 - t0));
          const float new_max = std::max(m[g], block_max);
          const float correction = std::exp(m[g] - new_max);  // exp(-inf) = 0 on the first block
          l[g] *= correction;
          for (int64_t i = 0; i < D; ++i) acc[g * D + i] *= correction;
          for (int64_t t = 0; t < t1 - t0; ++t) {
            s[t] = std::exp(s[t] - new_max);
            l[g] += s[t];
          }
          m[g] = new_max;
        }
        for (int64_t t = t0; t < t1; ++t) {  // weighted values
          to_float(v_cache + base + (t % S) * slot_stride, row.data(), D);
          for (int64_t g = 0; g < G; ++g) {
            const float p = scores[g * S + t - t0];
            float* a = &acc[g * D];
#pragma omp simd
            for (int64_t i = 0; i < D; ++i) a[i] += p * row[i];
          }
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        Q* o = out + (b * Hq + h * G + g) * D;
        const float inv = 1.f / l[g];
        for (int64_t i = 0; i < D; ++i) o[i] = static_cast<Q>(acc[g * D + i] * inv);
      }
    }
  });
}

void paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache,
                            const at::Tensor& v_cache, const at::Tensor& block_tables,
                            const at::Tensor& starts, const at::Tensor& lens, double scale,
                            at::Tensor& out) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(),
              "q [B, Hq, D], k/v_cache [N, S, Hkv, D]");
  TORCH_CHECK(q.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous() &&
              block_tables.is_contiguous() && out.is_contiguous(), "contiguous tensors only");
  TORCH_CHECK(out.sizes() == q.sizes() && out.scalar_type() == q.scalar_type(),
              "out matches q");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && starts.scalar_type() == at::kInt &&
              lens.scalar_type() == at::kInt, "int32 tables, starts and lens");
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t S = k_cache.size(1), Hkv = k_cache.size(2), W = block_tables.size(1);
  TORCH_CHECK(k_cache.size(3) == D && Hq % Hkv == 0, "head_dim matches, Hq % Hkv == 0");
  TORCH_CHECK(block_tables.size(0) == B && starts.numel() == B && lens.numel() == B,
              "one table, start and length per row");
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, k_cache.scalar_type(), "kv", [&] {
    using kv_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, q.scalar_type(), "q", [&] {
      decode_rows<kv_t, scalar_t>(
          q.data_ptr<scalar_t>(), k_cache.data_ptr<kv_t>(), v_cache.data_ptr<kv_t>(),
          block_tables.data_ptr<int32_t>(), starts.data_ptr<int32_t>(), lens.data_ptr<int32_t>(),
          out.data_ptr<scalar_t>(), B, Hq, Hkv, D, S, W, static_cast<float>(scale));
    });
  });
}

}  // namespace

TORCH_LIBRARY(tokenmill, m) {
  m.def("paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
        "Tensor starts, Tensor lens, float scale, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(tokenmill, CPU, m) {
  m.impl("paged_decode_attention", &paged_decode_attention);
}
