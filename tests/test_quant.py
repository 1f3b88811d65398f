"""CPU kernels of the rotated-quantization ops (longtune.rotate_fake_quant, quantize) against the
reference, plus registrations, STE gradients, edge cases, bad input and RotatedQuantLinear."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import longtune
from longtune.reference import quant as Q

from . import quant_cases as C

OPS = torch.ops.longtune


@pytest.mark.parametrize("case", C.CASES)
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fused_equals_rotation_then_reference(case, sym, dtype):
    n, hs, gran, gsz = case
    C.check_fused_equals_rotation_then_reference(
        OPS, OPS.hadamard_transform, "cpu", n, hs, gran, gsz, sym, 4, dtype
    )


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("gran,gsz", [("per_token", 0), ("per_group", 16), ("per_group", 1)])
def test_plain_quantizer_equals_reference(bits, sym, gran, gsz):
    C.check_plain_quantizer(OPS, "cpu", 128, gran, gsz, sym, bits, torch.float32)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
def test_quantizer_vs_float64_reference(bits, sym):
    # the float32 kernel vs the same formula in float64: codes may differ only where x / scale lands
    # within float32 rounding of a .5 boundary; the dequantized error is bounded by half a step
    x = torch.randn(64, 256) * 4
    y = OPS.rotate_fake_quant(x, bits, "per_token", 0, sym, 1.0, False, 0, "identity")
    y64 = Q.fake_quant(x.double(), bits, "per_token", None, sym, 1.0, compute_dtype=torch.float64)
    scale = Q.quantize(x.double(), bits, "per_token", None, sym, 1.0, compute_dtype=torch.float64)[
        1
    ]
    d = (y.double() - y64).abs()  # scale: [rows, 1 group]
    flips = d > 0.5 * scale  # a different code
    assert flips.float().mean() < 1e-3
    assert (
        d[~flips] <= 1e-6 * (y64.abs() + scale).expand_as(d)[~flips]
    ).all()  # else float32 rounding only
    assert ((y.double() - x.double()).abs() <= 0.5 * scale * (1 + 1e-5)).all()


def test_round_half_to_even():
    # scale = 7 / 7 = 1: codes of 0.5, 1.5, 2.5, -0.5, -2.5 are 0, 2, 2, -0, -2 (half to even),
    # not 1, 2, 3, -1, -3 (half away from zero)
    x = torch.tensor([[7.0, 0.5, 1.5, 2.5, -0.5, -2.5, 3.5, 0.0]])
    codes, scales, zeros = longtune.quantize(x, bits=4, rotate=False)
    assert scales.item() == 1.0 and zeros.item() == 0.0
    assert codes.tolist() == [[7, 0, 2, 2, 0, -2, 4, 0]]


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("value", [0.0, 3.25, -1.5])
def test_constant_and_zero_rows_are_finite(sym, value):
    x = torch.full((3, 64), value)
    for rotate in [False, True]:
        y = longtune.rotate_fake_quant(x, symmetric=sym, rotate=rotate)
        assert torch.isfinite(y).all()
        if not rotate:
            torch.testing.assert_close(y, x, rtol=1e-6, atol=1e-6)
    codes, scales, zeros = longtune.quantize(torch.zeros(2, 32), symmetric=sym)
    assert (
        (scales > 0).all()
        and torch.isfinite(scales).all()
        and (codes == (0 if sym else zeros[0, 0])).all()
    )


def test_asymmetric_range_and_zero_point():
    x = torch.linspace(-1, 3, 64).reshape(1, 64)
    codes, scales, zeros = longtune.quantize(x, bits=4, symmetric=False, rotate=False)
    assert codes.dtype == torch.uint8 and codes.min() == 0 and codes.max() == 15
    torch.testing.assert_close(scales, torch.tensor([[4.0 / 15]]))
    assert zeros.item() == round(1 / (4.0 / 15))
    y = longtune.rotate_fake_quant(x, bits=4, symmetric=False, rotate=False)
    torch.testing.assert_close(longtune.dequantize(codes, scales, zeros), y)


@pytest.mark.parametrize("case", [C.CASES[0], C.CASES[2], C.CASES[4]])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("ste", ["identity", "clip"])
def test_ste_backward(case, sym, ste):
    n, hs, gran, gsz = case
    C.check_ste(OPS, OPS.hadamard_transform_backward, "cpu", n, hs, gran, gsz, sym, ste)


def test_autograd_through_public_api():
    x = torch.randn(3, 64, requires_grad=True)
    y = longtune.rotate_fake_quant(x, bits=4)
    y.backward(torch.ones_like(y))
    # ste identity: grad_x = R^T 1
    expect = torch.ops.longtune.hadamard_transform_backward(torch.ones(3, 64).double(), 1 / 8.0)
    torch.testing.assert_close(x.grad.double(), expect)


def test_opcheck():
    x = torch.randn(3, 64, requires_grad=True)
    args = (4, "per_group", 16, False, 0.9, True, 0, "clip")
    torch.library.opcheck(OPS.rotate_fake_quant.default, (x,) + args)
    torch.library.opcheck(
        OPS.rotate_fake_quant_backward.default, (torch.randn(3, 64), x.detach()) + args
    )
    torch.library.opcheck(
        OPS.rotate_quantize.default, (x.detach(), 4, "per_group", 16, True, 0.9, True, 32)
    )


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    f = torch.compile(
        lambda t: longtune.rotate_fake_quant(t, bits=4, granularity="per_group", group_size=32) * 2,
        fullgraph=True,
        backend="aot_eager",
    )
    x = torch.randn(4, 128, requires_grad=True)
    y = f(x)
    torch.testing.assert_close(
        y,
        2 * longtune.rotate_fake_quant(x.detach(), bits=4, granularity="per_group", group_size=32),
    )
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        longtune.rotate_fake_quant(torch.randn(8, 1024))
    assert fc.get_total_flops() == 8 * 1024 * 10 + 6 * 8 * 1024


@settings(max_examples=30, deadline=None)
@given(
    rows=st.integers(0, 5),
    k=st.integers(0, 9),
    factor=st.sampled_from([1, 12, 20, 76]),
    bits=st.sampled_from([2, 3, 4, 8]),
    sym=st.booleans(),
    per_group=st.booleans(),
    clip=st.floats(0.05, 1.0),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
)
def test_random_shapes(rows, k, factor, bits, sym, per_group, clip, dtype):
    n = factor * 2**k
    if n > 8192:
        return
    gsz = (n // 4 if n % 4 == 0 and n >= 4 else n) if per_group else 0
    x = (torch.randn(rows, n) * 2).to(dtype)
    y = torch.ops.longtune.rotate_fake_quant(
        x, bits, "per_group" if per_group else "per_token", gsz, sym, clip, True, 0, "identity"
    )
    assert y.shape == x.shape and y.dtype == dtype
    if rows:
        r = C.rotated(x, n, 0, torch.ops.longtune.hadamard_transform)
        ref = Q.fake_quant(
            r, bits, "per_group" if per_group else "per_token", gsz or None, sym, clip
        ).to(dtype)
        assert torch.equal(y, ref)


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(bits=5), "bits must be 2, 3, 4 or 8, got 5"),
        (dict(bits=1), "bits must be 2, 3, 4 or 8, got 1"),
        (dict(clip_ratio=0.0), r"clip_ratio must be in \(0, 1\], got 0"),
        (dict(clip_ratio=1.5), r"clip_ratio must be in \(0, 1\], got 1.5"),
        (dict(clip_ratio=float("nan")), r"clip_ratio must be in \(0, 1\]"),
        (
            dict(granularity="per_group", group_size=48),
            r"group_size must be a positive divisor of the last dimension \(128\)",
        ),
        (dict(hadamard_size=48), r"hadamard_size must divide the last dimension \(128\), got 48"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(RuntimeError, match=match):
        longtune.rotate_fake_quant(torch.randn(2, 128), **kwargs)


def test_bad_python_arguments():
    with pytest.raises(ValueError, match="granularity must be one of"):
        longtune.rotate_fake_quant(torch.randn(2, 128), granularity="per_channel")
    with pytest.raises(ValueError, match="ste must be one of"):
        longtune.rotate_fake_quant(torch.randn(2, 128), ste="zero")
    with pytest.raises(ValueError, match="needs group_size"):
        longtune.rotate_fake_quant(torch.randn(2, 128), granularity="per_group")


def test_unsupported_hidden_size_lists_nearest():
    with pytest.raises(
        RuntimeError,
        match=r"cannot rotate: the last dimension n=92 .*Nearest supported below: 88\. "
        r"Nearest supported above: 96\.",
    ):
        longtune.rotate_fake_quant(torch.randn(2, 92))
    y = longtune.rotate_fake_quant(torch.randn(2, 92), rotate=False)  # no rotation: any size works
    assert y.shape == (2, 92)


@pytest.mark.parametrize("dtype", [torch.int32, torch.float64, torch.complex64])
def test_bad_dtype(dtype):
    with pytest.raises(RuntimeError, match="x must be float32, float16 or bfloat16"):
        torch.ops.longtune.rotate_fake_quant(
            torch.ones(2, 16, dtype=dtype), 4, "per_token", 0, True, 1.0, True, 0, "identity"
        )


def test_backward_shape_mismatch():
    with pytest.raises(RuntimeError, match="grad must have x's shape"):
        OPS.rotate_fake_quant_backward(
            torch.randn(2, 32), torch.randn(2, 64), 4, "per_token", 0, True, 1.0, True, 0, "clip"
        )


def test_empty():
    assert longtune.rotate_fake_quant(torch.randn(0, 64)).shape == (0, 64)
    c, s, z = longtune.quantize(torch.randn(0, 64))
    assert c.shape == (0, 64) and s.shape == (0, 1)


# ------------------------------------------------------------------ RotatedQuantLinear
def test_rotation_preserves_the_linear_map():
    torch.manual_seed(1)
    lin = torch.nn.Linear(256, 64).double()
    m = longtune.nn.RotatedQuantLinear(256, 64)
    x = torch.randn(5, 256, dtype=torch.float64)
    xr = longtune.hadamard_transform(x)
    wr = m._rotate_weight(lin.weight.detach())
    torch.testing.assert_close(xr @ wr.T + lin.bias.detach(), lin(x).detach())


def test_rotated_quant_linear_is_close_at_8_bits_and_trains():
    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 32)
    m = longtune.nn.RotatedQuantLinear.from_linear(lin, act_bits=8, weight_bits=8)
    x = torch.randn(16, 128)
    with torch.no_grad():
        rel = (m(x) - lin(x)).norm() / lin(x).norm()
    assert rel < 0.02
    m4 = longtune.nn.RotatedQuantLinear.from_linear(
        lin, act_bits=4, weight_bits=4, weight_group_size=32
    )
    opt = torch.optim.SGD(m4.parameters(), lr=0.05)
    target = torch.randn(16, 32)
    losses = []
    for _ in range(20):
        loss = torch.nn.functional.mse_loss(m4(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_rotated_weight_cache():
    m = longtune.nn.RotatedQuantLinear(64, 16)
    with torch.no_grad():
        w1 = m.rotated_weight()
        assert m.rotated_weight() is w1
        m.weight.add_(1.0)
        w2 = m.rotated_weight()
    assert w2 is not w1
    torch.testing.assert_close(w2, m._rotate_weight(m.weight.detach()))
    m.weight.data += (
        0.5  # bypasses the version counter (as peft's merge does): the fingerprint sees it
    )
    with torch.no_grad():
        torch.testing.assert_close(m.rotated_weight(), m._rotate_weight(m.weight.detach()))


def test_rotated_quant_linear_rejects_unsupported_size():
    with pytest.raises(RuntimeError, match="n=92 is not a supported Hadamard size"):
        longtune.nn.RotatedQuantLinear(92, 8)
