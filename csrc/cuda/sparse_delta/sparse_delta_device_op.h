// Host glue shared by the CUDA and the emulator bindings of the sparse-delta kernels.
#pragma once
#include <ATen/ATen.h>

#include "common/sparse_adamw_host.h"
#include "common/sparse_delta_host.h"
#include "cuda/common/torch_glue.h"
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
    gp.grad_out_t = gt.data_ptr();
    gp.x_t = xt.data_ptr();
    gp.idx = a.idx.data_ptr<int64_t>();
    gp.out = out.data_ptr<float>();
    gp.tokens = a.T;
    gp.grad_out_t_row_stride = a.T;  // gt, xt are contiguous
    gp.x_t_row_stride = a.T;
    gp.out_features = a.out;
    gp.in_features = a.in;
    gp.K = a.K;
    gp.dtype = to_dtype(grad_out);
    launch(gp);
  }
  return out.to(grad_out.scalar_type());
}

template <class Launch>
void sparse_adamw_device(const at::Tensor& values, const at::Tensor& grad, const at::Tensor& m, const at::Tensor& v,
                         const at::Tensor& age, double lr, double b1, double b2, double eps, double wd,
                         Launch&& launch) {
  const AdamWCfg c = check_adamw(values, grad, m, v, age, lr, b1, b2, eps, wd, /*allow_f64=*/false);
  if (values.numel() == 0) return;
  const at::Tensor g = grad.contiguous();
  AdamWParams ap;
  ap.values = values.data_ptr();
  ap.grad = g.data_ptr();
  ap.m = m.data_ptr<float>();
  ap.v = v.data_ptr<float>();
  ap.age = age.data_ptr<int32_t>();
  ap.n = values.numel();
  ap.lr = c.lr;
  ap.beta1 = c.beta1;
  ap.beta2 = c.beta2;
  ap.eps = c.eps;
  ap.weight_decay = c.weight_decay;
  ap.dtype = to_dtype(values);
  launch(ap);
}

}  // namespace lt::sparse_delta
