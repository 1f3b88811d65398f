"""The CUDA kernels of the fused linear + cross-entropy, run on the CPU emulator: forward and
backward against the float64 reference (2x rule) in fp32 / fp16 / bf16 with every option,
filter_eps, empty input, non-contiguous input and argument errors."""

import pytest
import torch

from longtune.testing import emulated, emulator_grid_cap

from . import cross_entropy_cases as C

FWD = emulated("linear_cross_entropy_fwd")
BWD = emulated("linear_cross_entropy_bwd")
FWD_BWD = emulated("linear_cross_entropy_fwd_bwd")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f16", "bf16"])
@pytest.mark.parametrize("case", C.CASES, ids=str)
def test_forward_backward(case, dtype):
    C.check_case(FWD, BWD, "cpu", case, dtype)


@pytest.mark.parametrize("case", [C.CASES[1], C.CASES[4]], ids=str)
def test_fwd_bwd_in_one_call(case):
    C.check_case_fused(FWD_BWD, "cpu", case, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_filter(dtype):
    C.check_filter(FWD, BWD, "cpu", C.Case(11, 70, 16, bias=True, eps=0.1), dtype)


def test_multiple_row_blocks():
    # 70 rows: two row blocks of 64 (the second partial), tiny V and d to keep the emulator fast
    C.check_case(FWD, BWD, "cpu", C.Case(70, 9, 3, bias=True, ignore="some"), torch.float32)


def test_empty():
    C.check_empty(FWD, BWD, "cpu", torch.float16)
    C.check_empty(FWD, BWD, "cpu", torch.float32)


def test_non_contiguous_inputs():
    c = C.Case(6, 40, 12, bias=True)
    x, w, b, target, grad = C.make_inputs(c, torch.float32, "cpu")
    xt = x.t().contiguous().t()  # column-major view
    wt = w.t().contiguous().t()
    ref = C.run_op(FWD, BWD, c, x, w, b, target, grad)
    out = C.run_op(FWD, BWD, c, xt, wt, b, target, grad)
    for r, o in zip(ref, out):
        assert torch.equal(r, o)


def test_errors():
    C.check_errors(FWD, BWD, "cpu")


# Grid cap: the emulated launchers give every grid-stride dimension at most `cap` blocks, so that
# one block walks several row blocks and vocabulary tiles (the merge and convert kernels several
# elements), as on a GPU with a large input. d = 0: the logits are the bias, no hidden chunks.
CAPPED_CASES = [
    C.Case(70, 150, 40, bias=True, ignore="some", eps=0.1),
    C.Case(130, 70, 3, ignore="some", z_loss=1e-3, softcap=4.0, class_weight=True),
    C.Case(70, 130, 0, bias=True, ignore="some"),
]


@pytest.mark.parametrize("cap", [1, 2])
@pytest.mark.parametrize("case", CAPPED_CASES, ids=str)
def test_grid_cap(case, cap):
    dtype = torch.bfloat16 if cap == 2 else torch.float32
    with emulator_grid_cap(cap):
        C.check_case(FWD, BWD, "cpu", case, dtype)


def _run(x, w, b, target, grad, filter_eps, cap=0):
    with emulator_grid_cap(cap):
        loss, lse, amax = FWD(x, w, b, target, -100, 0.0, 0.0, 0.0)
        dx, dw, db = BWD(grad, x, w, b, target, lse, -100, 0.0, 0.0, 0.0, filter_eps)
    return loss, lse, amax, dx, dw, db


@pytest.mark.parametrize("d", [0, 8])
def test_filter_skips_tiles_inside_a_block(d):
    # 4 vocabulary tiles; tiles 1 and 3 have logits 40 below the others and hold no target, so
    # every d logit there is below filter_eps: with a grid cap of 1 the block keeps tile 0, skips
    # 1, keeps 2, skips 3, then goes on with the next row block
    g = torch.Generator().manual_seed(3)
    T, V = 70, 256
    x = torch.randn(T, d, generator=g)
    w = torch.randn(V, d, generator=g) / max(1.0, d**0.5)
    b = torch.randn(V, generator=g)
    cold = torch.zeros(V, dtype=torch.bool)
    cold[64:128] = cold[192:256] = True
    b[cold] -= 40.0
    hot = torch.nonzero(~cold)[:, 0]
    target = hot[torch.randint(0, hot.numel(), (T,), generator=g)]
    target[5] = -100
    grad = torch.rand(T, generator=g) + 0.5
    exact = _run(x, w, b, target, grad, 0.0)
    assert torch.all(exact[5][cold] != 0)  # without the filter the cold tiles contribute
    capped = _run(x, w, b, target, grad, 1e-6, cap=1)
    for name, e, c in zip(["dx", "dweight", "dbias"], exact[3:], capped[3:]):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-6, msg=name)
    dw, db = capped[4], capped[5]
    assert torch.all(dw[cold] == 0) and torch.all(db[cold] == 0)  # skipped
    assert torch.all(db[~cold] != 0)  # kept
    for o, e in zip(capped[:3], exact[:3]):
        assert torch.equal(o, e)


@pytest.mark.parametrize("d", [0, 5])
def test_dead_row_blocks_inside_a_block(d):
    # row block 1 has only ignored rows and row block 2 a zero loss gradient: no work, and with a
    # grid cap of 1 the block that skips them goes on with the next row block
    c = C.Case(230, 70, d, bias=True)
    x, w, b, target, grad = C.make_inputs(c, torch.float32, "cpu")
    target[64:128] = c.ignore_index
    grad[128:192] = 0.0
    ref = C.run_op(FWD, BWD, c, x, w, b, target, grad)
    with emulator_grid_cap(1):
        out = C.run_op(FWD, BWD, c, x, w, b, target, grad)
    for r, o in zip(ref, out):
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-6)
    assert torch.all(ref[2][64:192] == 0)
