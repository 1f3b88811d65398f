"""The rotated-quantization CUDA kernels on a real GPU (skipped without one)."""

import pytest
import torch

from .. import quant_cases as C

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
OPS = torch.ops.longtune


@pytest.mark.parametrize(
    "case", C.CASES + [(18944, 0, "per_token", 0), (32768, 0, "per_group", 128)]
)
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_equals_rotation_then_reference(case, sym, dtype):
    n, hs, gran, gsz = case
    C.check_fused_equals_rotation_then_reference(
        OPS, OPS.hadamard_transform, "cuda", n, hs, gran, gsz, sym, 4, dtype, rows=17
    )


@pytest.mark.parametrize("case", [C.CASES[1], C.CASES[2], C.CASES[5]])
@pytest.mark.parametrize("ste", ["identity", "clip"])
def test_ste_backward(case, ste):
    n, hs, gran, gsz = case
    C.check_ste(OPS, OPS.hadamard_transform_backward, "cuda", n, hs, gran, gsz, False, ste)


def test_matches_emulator():
    x = torch.randn(5, 2048, dtype=torch.bfloat16)
    args = (4, "per_group", 64, False, 0.9, True, 128, "identity")
    assert torch.equal(
        OPS.rotate_fake_quant(x.cuda(), *args).cpu(),
        torch.ops.longtune_emu.rotate_fake_quant(x, *args),
    )


def test_many_rows():
    x = torch.randn(1 << 20, 64, device="cuda", dtype=torch.bfloat16)
    y = OPS.rotate_fake_quant(x, 4, "per_token", 0, True, 1.0, True, 0, "identity")
    assert torch.isfinite(y.float()).all()
    tail = x[-8:]
    assert torch.equal(
        y[-8:],
        OPS.rotate_fake_quant(tail.contiguous(), 4, "per_token", 0, True, 1.0, True, 0, "identity"),
    )


def test_shared_memory_limit_is_this_gpus():
    """A row (+ its group scales) that does not fit this GPU's per-block shared memory (sm_80:
    163 KiB, sm_90: 227 KiB) is refused with the sizes, naming group_size -- not a launch error."""
    limit = torch.cuda.get_device_properties(0).shared_memory_per_block_optin
    fits = (limit // 4 - 2) // 8 * 8  # per_token: n + 2 floats
    args = (4, "per_token", 0, True, 1.0, False, 0, "identity")
    x = torch.randn(1, fits, device="cuda")
    torch.ops.longtune.rotate_fake_quant(x, *args)
    with pytest.raises(RuntimeError, match=f"> {limit} bytes per block .* group_size"):
        torch.ops.longtune.rotate_fake_quant(torch.randn(1, fits + 8, device="cuda"), *args)
