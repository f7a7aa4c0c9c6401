// CPU kernel of cctk::label_sum: per-label sums of the rows of x (B, N) into float32 (K, N).
// Parallel over column chunks, so each thread owns a disjoint slice of the output and no
// atomics or per-thread copies are needed; labels are validated before anything is written.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/torch.h>

namespace cctk {
namespace {

template <typename scalar_t>
void label_sum_kernel(const scalar_t* x, const int64_t* labels, float* sums, int64_t B, int64_t N) {
  constexpr int64_t kChunk = 256;
  at::parallel_for(0, (N + kChunk - 1) / kChunk, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t n0 = c * kChunk, n1 = std::min(N, n0 + kChunk);
      for (int64_t b = 0; b < B; ++b) {
        const scalar_t* xr = x + b * N;
        float* sr = sums + labels[b] * N;
#pragma omp simd
        for (int64_t n = n0; n < n1; ++n) sr[n] += static_cast<float>(xr[n]);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> label_sum_cpu(const at::Tensor& x, const at::Tensor& labels,
                                                 int64_t num_labels) {
  TORCH_CHECK(x.dim() == 2, "cctk::label_sum: x must be 2-D (batch, features), got ", x.sizes());
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == x.size(0),
              "cctk::label_sum: labels must be 1-D with one entry per row of x");
  TORCH_CHECK(labels.scalar_type() == at::kLong, "cctk::label_sum: labels must be int64");
  TORCH_CHECK(num_labels > 0, "cctk::label_sum: num_labels must be positive");
  auto xc = x.contiguous();
  auto lc = labels.contiguous();
  const int64_t B = xc.size(0), N = xc.size(1);
  const int64_t* lp = lc.data_ptr<int64_t>();
  auto counts = at::zeros({num_labels}, labels.options());
  int64_t* cp = counts.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(lp[b] >= 0 && lp[b] < num_labels, "cctk::label_sum: label ", lp[b],
                " at position ", b, " is outside [0, ", num_labels, ")");
  }
  for (int64_t b = 0; b < B; ++b) cp[lp[b]] += 1;
  auto sums = at::zeros({num_labels, N}, x.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, xc.scalar_type(), "label_sum_cpu", [&] {
    label_sum_kernel<scalar_t>(xc.data_ptr<scalar_t>(), lp, sums.data_ptr<float>(), B, N);
  });
  return {sums, counts};
}

}  // namespace

TORCH_LIBRARY_IMPL(cctk, CPU, m) { m.impl("label_sum", &label_sum_cpu); }

}  // namespace cctk
