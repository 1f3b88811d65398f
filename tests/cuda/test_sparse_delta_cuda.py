"""The sparse-delta gradient CUDA kernel on a real GPU (skipped without one)."""

import pytest
import torch

from longtune.reference import sparse_delta as R
from longtune.testing import assert_within_2x

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "T,out,inp,density", [(4096, 512, 512, 0.01), (77, 33, 65, 0.5), (1, 8, 8, 1.0)]
)
def test_grad(dtype, T, out, inp, density):
    g = torch.Generator().manual_seed(0)
    gy = torch.randn(T, out, generator=g).to(dtype).cuda()
    x = torch.randn(T, inp, generator=g).to(dtype).cuda()
    idx = torch.randperm(out * inp, generator=g)[: int(density * out * inp)].sort().values.cuda()
    got = torch.ops.longtune.sparse_delta_grad(gy, x, idx, inp)
    ref = R.sparse_delta_grad(gy.cpu(), x.cpu(), idx.cpu(), inp, torch.float64)
    same = (gy.T @ x).reshape(-1)[idx]
    assert_within_2x(got.cpu(), ref.double(), same.cpu(), f"cuda T={T}")


def test_module_on_gpu():
    import longtune

    m = longtune.nn.SparseDeltaLinear(torch.nn.Linear(64, 32).cuda(), density=0.1, seed=0)
    x = torch.randn(8, 64, device="cuda", requires_grad=True)
    m(x).sum().backward()
    assert m.values.grad is not None and torch.isfinite(m.values.grad).all()
