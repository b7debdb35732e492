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
// Each row is one task (or a few, when rows are fewer than threads): it reads each of its slots
// once, whole (every kv head's row, contiguous; reading a head's row per task instead read every
// cache line three times and was 1.6-2x slower once the cache outgrew L3), each kv head's row
// serving its Hq / Hkv query heads (grouped-query attention); a running max and sum (online
// softmax, as flash attention) keep one block's scores at a time. Arithmetic in float32.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

inline float dot(const float* a, const float* b, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
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
  const int64_t slot_size = Hkv * D;  // one slot: every kv head's row, contiguous
  // Fewer rows than threads: each row's blocks are split into `parts` ranges attended apart
  // and merged at the end (flash-decoding), so that every thread has work.
  const int64_t threads = at::get_num_threads();
  const int64_t parts = B >= threads ? 1 : (2 * threads + B - 1) / B;
  std::vector<float> part_acc(B * parts * Hq * D), part_m(B * parts * Hq), part_l(B * parts * Hq);
  at::parallel_for(0, B * parts, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(Hq * D), slot(slot_size), scores(Hq * S);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / parts, part = task % parts;
      float* acc = &part_acc[task * Hq * D];
      float* m = &part_m[task * Hq];
      float* l = &part_l[task * Hq];
      std::fill(acc, acc + Hq * D, 0.f);
      std::fill(m, m + Hq, -std::numeric_limits<float>::infinity());
      std::fill(l, l + Hq, 0.f);
      to_float(q + b * Hq * D, qf.data(), Hq * D);
      for (int64_t i = 0; i < Hq * D; ++i) qf[i] *= scale;
      const int32_t* table = tables + b * W;
      const int64_t first = starts[b], last = lens[b];  // keys [first, last)
      const int64_t blk0 = first / S, blocks = (last - 1) / S + 1 - blk0;
      const int64_t end_blk = blk0 + blocks * (part + 1) / parts;
      for (int64_t blk = blk0 + blocks * part / parts; blk < end_blk; ++blk) {
        const int64_t t0 = std::max(first, blk * S), t1 = std::min(last, (blk + 1) * S);
        const int64_t base = int64_t(table[blk]) * S * slot_size;
        for (int64_t t = t0; t < t1; ++t) {  // scores [Hq, n]: each slot read and converted once
          to_float(k_cache + base + (t % S) * slot_size, slot.data(), slot_size);
          for (int64_t j = 0; j < Hq; ++j)
            scores[j * S + t - t0] = dot(&qf[j * D], &slot[(j / G) * D], D);
        }
        for (int64_t j = 0; j < Hq; ++j) {  // rescale what came before to the new max
          float* s = &scores[j * S];
          const float new_max = std::max(m[j], *std::max_element(s, s + (t1 - t0)));
          const float correction = std::exp(m[j] - new_max);  // exp(-inf) = 0 on the first block
          l[j] *= correction;
          for (int64_t i = 0; i < D; ++i) acc[j * D + i] *= correction;
          for (int64_t t = 0; t < t1 - t0; ++t) {
            s[t] = std::exp(s[t] - new_max);
            l[j] += s[t];
          }
          m[j] = new_max;
        }
        for (int64_t t = t0; t < t1; ++t) {  // weighted values
          to_float(v_cache + base + (t % S) * slot_size, slot.data(), slot_size);
          for (int64_t j = 0; j < Hq; ++j) {
            const float p = scores[j * S + t - t0];
            const float* v = &slot[(j / G) * D];
            float* a = &acc[j * D];
#pragma omp simd
            for (int64_t i = 0; i < D; ++i) a[i] += p * v[i];
          }
        }
      }
    }
  });
  // Merge each row's parts: weights exp(m_part - max), an empty part (m = -inf) weighing 0.
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> o(D);
    for (int64_t b = begin; b < end; ++b) {
      for (int64_t j = 0; j < Hq; ++j) {
        float max = -std::numeric_limits<float>::infinity(), sum = 0.f;
        for (int64_t part = 0; part < parts; ++part) max = std::max(max, part_m[(b * parts + part) * Hq + j]);
        std::fill(o.begin(), o.end(), 0.f);
        for (int64_t part = 0; part < parts; ++part) {
          const int64_t at = (b * parts + part) * Hq + j;
          const float w = std::exp(part_m[at] - max);
          sum += part_l[at] * w;
          for (int64_t i = 0; i < D; ++i) o[i] += part_acc[at * D + i] * w;
        }
        Q* dst = out + (b * Hq + j) * D;
        for (int64_t i = 0; i < D; ++i) dst[i] = static_cast<Q>(o[i] / sum);
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
