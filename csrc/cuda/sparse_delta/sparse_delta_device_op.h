// Host glue shared by the CUDA and the emulator bindings of the sparse-delta kernels.
#pragma once
#include <ATen/ATen.h>

#include "common/sparse_delta_host.h"
#include "cuda/sparse_delta/sparse_delta_params.h"

namespace lt::sparse_delta {

template <class Launch>
at::Tensor sparse_delta_grad_device(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& indices,
                                    int64_t in_features, Launch&& launch) {
  const GradArgs a = prepare_grad("sparse_delta_grad", grad_out, x, indices, in_features, /*allow_f64=*/false);
  at::Tensor out = at::zeros({a.K}, grad_out.options().dtype(at::kFloat));
  if (a.K > 0 && a.T > 0) {
    // transposed once so that a warp's lanes read consecutive tokens of one feature (coalesced)
    const at::Tensor gt = grad_out.reshape({a.T, a.out}).t().contiguous();
    const at::Tensor xt = x.reshape({a.T, a.in}).t().contiguous();
    GradParams gp;
    gp.gt = gt.data_ptr();
    gp.xt = xt.data_ptr();
    gp.idx = a.idx.data_ptr<int64_t>();
    gp.out = out.data_ptr<float>();
    gp.T = a.T;
    gp.out_features = a.out;
    gp.in_features = a.in;
    gp.K = a.K;
    gp.dtype = grad_out.scalar_type() == at::kFloat ? hadamard::DType::F32
               : grad_out.scalar_type() == at::kHalf ? hadamard::DType::F16 : hadamard::DType::BF16;
    launch(gp);
  }
  return out.to(grad_out.scalar_type());
}

}  // namespace lt::sparse_delta
