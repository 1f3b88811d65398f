"""The one-pass linear_cross_entropy_fwd_bwd on a real GPU (skipped without one): against the
composed forward + backward ops on the device and the float64 reference (2x rule), one and
several row chunks (LT_LCE_DEVICE_ROWS), fp32 / fp16 / bf16, and the public loss's gradients."""

import pytest
import torch

from .. import cross_entropy_cases as C

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
OPS = torch.ops.longtune
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["f32", "f16", "bf16"]
CASES = [
    C.Case(300, 5000, 256, bias=True, ignore="some", eps=0.1, z_loss=1e-4, softcap=15.0),
    C.Case(77, 1031, 97, bias=True, z_loss=1e-3),
    C.Case(513, 4099, 40, ignore="some", ignore_index=0, class_weight=True, eps=0.1),
]


def _fused(c, x, w, b, target, grad, weight_grad=True):
    return OPS.linear_cross_entropy_fwd_bwd(
        x,
        w,
        b,
        target,
        grad.float(),
        c.ignore_index,
        c.eps,
        c.z_loss,
        c.softcap,
        weight_grad,
        C.class_weight(c, x.device),
    )


@pytest.mark.parametrize("rows", [0, 128, 100], ids=["rows-auto", "rows128", "rows100"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_one_pass_vs_composed_on_device(case, dtype, rows, monkeypatch):
    if rows:
        monkeypatch.setenv("LT_LCE_DEVICE_ROWS", str(rows))
    C.check_case_fused(OPS.linear_cross_entropy_fwd_bwd, "cuda", case, dtype)
    x, w, b, target, grad = C.make_inputs(case, dtype, "cuda", seed=1)
    one = _fused(case, x, w, b, target, grad)
    two = C.run_op(
        OPS.linear_cross_entropy_fwd, OPS.linear_cross_entropy_bwd, case, x, w, b, target, grad
    )
    for name, a, r in zip(["loss", "lse", "dx", "dweight", "dbias"], one[:5], two[:5]):
        a, r = a.double().cpu(), r.double().cpu()
        scale = max(1.0, r.abs().max().item()) if r.numel() else 1.0
        tol = 1e-4 if dtype == torch.float32 or name in ("loss", "lse") else 2e-2
        assert (a - r).abs().max().item() <= tol * scale, f"{case} {dtype} {name}"
    frozen = _fused(case, x, w, b, target, grad, weight_grad=False)
    assert frozen[3].numel() == 0 and frozen[4].numel() == 0
    # dx up to the order of its fp32 atomics (several vocabulary tiles add to each row)
    torch.testing.assert_close(frozen[2].float(), one[2].float(), rtol=1e-2, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_public_loss_rounds_the_gradients_once(dtype):
    import longtune

    c = C.Case(200, 3000, 64, bias=True, ignore="some")
    x, w, b, target, _ = C.make_inputs(c, dtype, "cuda")
    xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
    (longtune.linear_cross_entropy(xs, ws, target, bs) * 1024.0).backward()
    rows = (target != -100).float() / int((target != -100).sum())
    full = OPS.linear_cross_entropy_fwd_bwd(
        x, w, b, target, rows, -100, 0.0, 0.0, 0.0, True, None, True
    )
    # the scaled fp32 accumulators, rounded once (up to the order of the fp32 atomics)
    for got, acc in zip((xs.grad, ws.grad, bs.grad), full[2:5]):
        assert got.dtype == dtype and acc.dtype == torch.float32
        ref = (acc * 1024.0).to(dtype).float()
        torch.testing.assert_close(got.float(), ref, rtol=2 * torch.finfo(dtype).eps, atol=1e-6)
