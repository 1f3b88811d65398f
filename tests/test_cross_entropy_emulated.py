"""The CUDA kernels of the fused linear + cross-entropy, run on the CPU emulator: forward and
backward against the float64 reference (2x rule) in fp32 / fp16 / bf16 with every option,
filter_eps, empty input, non-contiguous input and argument errors."""

import pytest
import torch

from longtune.testing import emulated

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
