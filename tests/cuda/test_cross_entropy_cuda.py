"""The fused linear + cross-entropy CUDA kernels on a real GPU (skipped without one): the emulated
tests' cases plus larger shapes against the float64 reference (2x rule), filter_eps, errors."""

import pytest
import torch

from .. import cross_entropy_cases as C

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
OPS = torch.ops.longtune
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f16", "bf16"])
@pytest.mark.parametrize("case", C.CASES + C.GPU_CASES, ids=str)
def test_forward_backward(case, dtype):
    C.check_case(OPS.linear_cross_entropy_fwd, OPS.linear_cross_entropy_bwd, "cuda", case, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", [C.CASES[1], C.GPU_CASES[0]], ids=str)
def test_fwd_bwd_in_one_call(case, dtype):
    C.check_case_fused(OPS.linear_cross_entropy_fwd_bwd, "cuda", case, dtype)


def test_public_mean_loss_and_grads_on_cuda():
    c = C.Case(64, 500, 32, bias=True, ignore="some")
    x, w, b, target, _ = C.make_inputs(c, torch.float32, "cuda")
    import longtune

    xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
    longtune.linear_cross_entropy(xs, ws, target, bs).backward()
    xr, wr, br = (t.double().requires_grad_() for t in (x, w, b))
    torch.nn.functional.cross_entropy(xr @ wr.T + br, target).backward()
    for got, ref in ((xs.grad, xr.grad), (ws.grad, wr.grad), (bs.grad, br.grad)):
        torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f16", "bf16"])
def test_filter(dtype):
    C.check_filter(
        OPS.linear_cross_entropy_fwd,
        OPS.linear_cross_entropy_bwd,
        "cuda",
        C.Case(100, 3000, 64, bias=True, eps=0.1),
        dtype,
    )


def test_empty():
    C.check_empty(
        OPS.linear_cross_entropy_fwd, OPS.linear_cross_entropy_bwd, "cuda", torch.bfloat16
    )


def test_matches_emulator():
    c = C.Case(20, 70, 40, bias=True, ignore="some", eps=0.1, z_loss=1e-3, softcap=4.0)
    x, w, b, target, grad = C.make_inputs(c, torch.bfloat16, "cpu")
    emu = C.run_op(
        torch.ops.longtune_emu.linear_cross_entropy_fwd,
        torch.ops.longtune_emu.linear_cross_entropy_bwd,
        c,
        x,
        w,
        b,
        target,
        grad,
    )
    dev = C.run_op(
        OPS.linear_cross_entropy_fwd,
        OPS.linear_cross_entropy_bwd,
        c,
        x.cuda(),
        w.cuda(),
        b.cuda(),
        target.cuda(),
        grad.cuda(),
    )
    for e, d in zip(emu, dev):
        torch.testing.assert_close(
            d.cpu().float(), e.float(), rtol=1e-2, atol=1e-3
        )  # bf16 outputs: an ulp may flip


def test_errors():
    C.check_errors(OPS.linear_cross_entropy_fwd, OPS.linear_cross_entropy_bwd, "cuda")
