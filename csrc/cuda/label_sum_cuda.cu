// CUDA kernel of cctk::label_sum: per-label sums of the rows of x (B, N) into float32 (K, N).
// One thread per (row, column) pair with a float atomicAdd into the label's row: the K x N
// output is small and stays in L2. No host sync (the op can be captured in a CUDA graph): labels
// are range-checked on the device (at::_assert_async, in stream order, so a bad label stops the
// stream with a device-side assert before the kernel runs), the kernel itself skips any label
// outside [0, K), and the counts come from index_add_ (bincount would read labels.max() on the host).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include <torch/torch.h>

namespace cctk {
namespace {

template <typename scalar_t>
__global__ void label_sum_cuda_kernel(const scalar_t* __restrict__ x, const int64_t* __restrict__ labels,
                                      float* __restrict__ sums, int64_t B, int64_t N, int64_t K) {
  const int64_t total = B * N;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total;
       i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t b = i / N, n = i - b * N;
    const int64_t k = labels[b];
    if (k < 0 || k >= K) continue;  // never reached after the assert; never a stray write
    atomicAdd(sums + k * N + n, static_cast<float>(x[i]));
  }
}

std::tuple<at::Tensor, at::Tensor> label_sum_cuda(const at::Tensor& x, const at::Tensor& labels,
                                                  int64_t num_labels) {
  TORCH_CHECK(x.dim() == 2, "cctk::label_sum: x must be 2-D (batch, features), got ", x.sizes());
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == x.size(0),
              "cctk::label_sum: labels must be 1-D with one entry per row of x");
  TORCH_CHECK(labels.scalar_type() == at::kLong, "cctk::label_sum: labels must be int64");
  TORCH_CHECK(labels.device() == x.device(), "cctk::label_sum: labels and x on different devices");
  TORCH_CHECK(num_labels > 0, "cctk::label_sum: num_labels must be positive");
  c10::cuda::CUDAGuard guard(x.device());
  auto xc = x.contiguous();
  auto lc = labels.contiguous();
  const int64_t B = xc.size(0), N = xc.size(1);
  if (B > 0) at::_assert_async(at::logical_and(lc.ge(0), lc.lt(num_labels)).all());
  auto counts = at::zeros({num_labels}, lc.options()).index_add_(0, lc, at::ones_like(lc));
  auto sums = at::zeros({num_labels, N}, x.options().dtype(at::kFloat));
  if (B == 0 || N == 0) return {sums, counts};
  const int threads = 256;
  const unsigned grid = static_cast<unsigned>(std::min<int64_t>((B * N + threads - 1) / threads, 65536));
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, xc.scalar_type(), "label_sum_cuda", [&] {
    label_sum_cuda_kernel<scalar_t><<<grid, threads, 0, stream>>>(
        xc.data_ptr<scalar_t>(), lc.data_ptr<int64_t>(), sums.data_ptr<float>(), B, N, num_labels);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {sums, counts};
}

}  // namespace

TORCH_LIBRARY_IMPL(cctk, CUDA, m) { m.impl("label_sum", &label_sum_cuda); }

}  // namespace cctk
