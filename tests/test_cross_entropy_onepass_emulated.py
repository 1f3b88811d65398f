"""The one-pass CUDA linear_cross_entropy_fwd_bwd (logits formed once per chunk of rows, kept as
fp32 in a scratch, turned into d logits by the backward kernel) on the CPU emulator: against the
float64 reference (2x rule: the kernel's error is at most twice PyTorch's in the same dtype) and
against the composed forward + backward ops, on awkward shapes (T, V not multiples of the 64-row /
64-column tiles, d not a multiple of the 32-column chunk), several row chunks (LT_LCE_DEVICE_ROWS),
every option, fp32 / fp16 / bf16, and under the emulator's grid cap (grid-stride loops)."""

import pytest
import torch

from longtune.testing import emulated, emulator_grid_cap

from . import cross_entropy_cases as C

FWD = emulated("linear_cross_entropy_fwd")
BWD = emulated("linear_cross_entropy_bwd")
FWD_BWD = emulated("linear_cross_entropy_fwd_bwd")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["f32", "f16", "bf16"]

CASES = [
    C.Case(150, 130, 40, bias=True, ignore="some", eps=0.1),
    C.Case(77, 70, 17, z_loss=1e-2, softcap=3.0),
    C.Case(
        130, 97, 24, bias=True, ignore="some", eps=0.2, z_loss=1e-3, softcap=4.0, ignore_index=3
    ),
    C.Case(110, 70, 40, bias=True, ignore="some", eps=0.1, z_loss=1e-3, class_weight=True),
    C.Case(9, 33, 17, class_weight=True),
    C.Case(70, 20, 8, bias=True, ignore="all"),
    C.Case(66, 65, 0, bias=True, ignore="some"),  # d = 0: the logits are the bias
]


@pytest.fixture
def chunk_rows(monkeypatch):
    """Sets LT_LCE_DEVICE_ROWS (read at every call) for the test."""

    def set_rows(n):
        if n:
            monkeypatch.setenv("LT_LCE_DEVICE_ROWS", str(n))
        else:
            monkeypatch.delenv("LT_LCE_DEVICE_ROWS", raising=False)

    return set_rows


def _fused(c, x, w, b, target, grad, weight_grad=True, fp32_grads=False):
    return FWD_BWD(
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
        fp32_grads,
    )


def _close_to_composed(c, dtype, one, two):
    """One-pass vs forward + backward: the same logits (the same tile products), lse / loss up to
    the order of the vocabulary splits' merge, the gradients up to a d logit rounded the other way
    in a 16-bit dtype."""
    names = ["loss", "lse", "dx", "dweight", "dbias", "argmax"]
    for name, a, r in zip(names, one, two):
        assert a.shape == r.shape, name
        if name == "argmax":
            assert torch.equal(a, r), name
            continue
        a, r = a.double(), r.double()
        scale = max(1.0, r.abs().max().item()) if r.numel() else 1.0
        tol = (
            1e-5 if dtype == torch.float32 else 2e-2 if name in ("dx", "dweight", "dbias") else 1e-4
        )
        err = (a - r).abs().max().item() if r.numel() else 0.0
        assert err <= tol * scale, f"{c} {dtype} {name}: {err} > {tol * scale}"


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("rows", [0, 64, 50], ids=["rows-auto", "rows64", "rows50"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_against_float64_reference(case, rows, dtype, chunk_rows):
    chunk_rows(rows)
    C.check_case_fused(FWD_BWD, "cpu", case, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", CASES[:4], ids=str)
def test_against_composed(case, dtype, chunk_rows):
    chunk_rows(64)
    x, w, b, target, grad = C.make_inputs(case, dtype, "cpu", seed=1)
    one = _fused(case, x, w, b, target, grad)
    two = C.run_op(FWD, BWD, case, x, w, b, target, grad)
    _close_to_composed(case, dtype, one, two)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_fp32_grads_are_the_accumulators(dtype, chunk_rows):
    # fp32_grads: the same gradients, not rounded (rounding them gives the default outputs)
    chunk_rows(64)
    c = CASES[0]
    x, w, b, target, grad = C.make_inputs(c, dtype, "cpu")
    rounded = _fused(c, x, w, b, target, grad)
    full = _fused(c, x, w, b, target, grad, fp32_grads=True)
    for r, f in zip(rounded[2:5], full[2:5]):
        assert f.dtype == torch.float32
        assert torch.equal(f.to(dtype), r)
    for r, f in zip(rounded[:2] + rounded[5:], full[:2] + full[5:]):
        assert torch.equal(r, f)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_without_weight_grad(dtype, chunk_rows):
    chunk_rows(64)
    c = CASES[3]
    x, w, b, target, grad = C.make_inputs(c, dtype, "cpu")
    full = _fused(c, x, w, b, target, grad)
    frozen = _fused(c, x, w, b, target, grad, weight_grad=False)
    for a, r in zip(frozen[:3] + frozen[5:], full[:3] + full[5:]):
        assert torch.equal(a, r)
    assert frozen[3].numel() == 0 and frozen[4].numel() == 0


# Grid cap: every grid-stride dimension gets at most `cap` blocks, so that one block walks several
# row blocks of its chunk and several vocabulary tiles (a chunk of 130 rows: 3 row blocks).
@pytest.mark.parametrize("cap", [1, 2])
@pytest.mark.parametrize("case", CASES[:3] + CASES[6:], ids=str)
def test_grid_cap(case, cap, chunk_rows):
    chunk_rows(130)
    dtype = torch.bfloat16 if cap == 2 else torch.float32
    with emulator_grid_cap(cap):
        C.check_case_fused(FWD_BWD, "cpu", case, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
def test_zero_tiles_and_dead_row_blocks_are_skipped(dtype, chunk_rows):
    # vocabulary tiles 1 and 3 sit 1e4 below the others and hold no target: every d logit there is
    # exactly 0 and the tile is skipped (dW and dbias rows stay 0); row block 1 has only ignored
    # rows, row block 2 a zero loss weight: no work. Grid cap 1: one block walks all of them.
    chunk_rows(130)
    g = torch.Generator().manual_seed(3)
    T, V, d = 230, 256, 24
    c = C.Case(T, V, d, bias=True)
    x = torch.randn(T, d, generator=g).to(dtype)
    w = (torch.randn(V, d, generator=g) / d**0.5).to(dtype)
    b = torch.randn(V, generator=g)
    cold = torch.zeros(V, dtype=torch.bool)
    cold[64:128] = cold[192:256] = True
    b[cold] -= 1e4
    b = b.to(dtype)
    hot = torch.nonzero(~cold)[:, 0]
    target = hot[torch.randint(0, hot.numel(), (T,), generator=g)]
    target[5] = -100
    target[64:128] = -100
    grad = torch.rand(T, generator=g) + 0.5
    grad[128:192] = 0.0
    with emulator_grid_cap(1):
        one = _fused(c, x, w, b, target, grad)
    two = C.run_op(FWD, BWD, c, x, w, b, target, grad)
    _close_to_composed(c, dtype, one, two)
    dx, dw, db = one[2:5]
    assert torch.all(dw[cold] == 0) and torch.all(db[cold] == 0)
    assert torch.all(db[~cold] != 0)
    assert torch.all(dx[64:192] == 0) and torch.all(dx[5] == 0)


def test_empty_and_errors():
    x = torch.randn(0, 8, dtype=torch.float16)
    w = torch.randn(10, 8, dtype=torch.float16)
    t = torch.zeros(0, dtype=torch.long)
    loss, lse, dx, dw, db, amax = FWD_BWD(x, w, None, t, torch.zeros(0), -100, 0.0, 0.0, 0.0)
    assert loss.shape == (0,) and dx.shape == (0, 8) and dw.shape == (10, 8)
    assert dx.dtype == dw.dtype == torch.float16 and torch.all(dw == 0) and db.numel() == 0
    x = torch.randn(3, 8)
    w = torch.randn(10, 8)
    with pytest.raises(RuntimeError, match=r"target\[1\] = 10 is out of range"):
        FWD_BWD(x, w, None, torch.tensor([1, 10, 2]), torch.ones(3), -100, 0.0, 0.0, 0.0)
    with pytest.raises(RuntimeError, match="grad_rows must be"):
        FWD_BWD(x, w, None, torch.tensor([1, 2, 3]), torch.ones(2), -100, 0.0, 0.0, 0.0)


def test_bad_chunk_knob_falls_back(chunk_rows):
    # a value that is not a row count is reported on stderr and the automatic chunk is used
    chunk_rows("many")
    c = C.Case(70, 33, 8)
    x, w, b, target, grad = C.make_inputs(c, torch.float32, "cpu")
    out = _fused(c, x, w, b, target, grad)
    chunk_rows(0)
    ref = _fused(c, x, w, b, target, grad)
    for a, r in zip(out, ref):
        assert torch.equal(a, r)
