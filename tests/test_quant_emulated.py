"""The CUDA kernel's device code of the rotated-quantization ops, run on the CPU emulator: fused
result = the emulated Hadamard rotation followed by the reference quantizer, bit for bit; codes,
scales, zeros; STE gradients; the plain quantizer; agreement with the CPU kernel."""

import pytest
import torch

from longtune.testing import emulator_grid_cap

from . import quant_cases as C

EMU = torch.ops.longtune_emu


@pytest.mark.parametrize("case", C.CASES)
@pytest.mark.parametrize("sym", [True, False])
def test_fused_equals_rotation_then_reference(case, sym):
    n, hs, gran, gsz = case
    dtype = [torch.float32, torch.bfloat16, torch.float16][(n + hs + gsz) % 3]
    C.check_fused_equals_rotation_then_reference(
        EMU, EMU.hadamard_transform, "cpu", n, hs, gran, gsz, sym, 4, dtype, rows=2
    )


@pytest.mark.parametrize("bits", [2, 3, 8])
@pytest.mark.parametrize("gran,gsz", [("per_token", 0), ("per_group", 16)])
def test_plain_quantizer(bits, gran, gsz):
    C.check_plain_quantizer(EMU, "cpu", 96, gran, gsz, bits % 2 == 0, bits, torch.bfloat16)


@pytest.mark.parametrize("case", [C.CASES[0], C.CASES[2], C.CASES[4]])
@pytest.mark.parametrize("ste", ["identity", "clip"])
def test_ste_backward(case, ste):
    n, hs, gran, gsz = case
    C.check_ste(EMU, EMU.hadamard_transform_backward, "cpu", n, hs, gran, gsz, True, ste)


@pytest.mark.parametrize("n", [64, 1024])
def test_matches_cpu_kernel_for_power_of_two_rotations(n):
    # same butterfly order on both backends: identical rotated values, identical outputs
    x = torch.randn(3, n, dtype=torch.bfloat16)
    for sym in [True, False]:
        args = (4, "per_group", 32, sym, 0.9, True, 0, "identity")
        assert torch.equal(
            EMU.rotate_fake_quant(x, *args), torch.ops.longtune.rotate_fake_quant(x, *args)
        )


def test_misaligned_rows_and_constant_rows():
    big = torch.randn(3, 129)
    x = big[:, 1:]  # odd element offset: scalar loads
    args = (4, "per_token", 0, True, 1.0, True, 0, "identity")
    assert torch.equal(
        EMU.rotate_fake_quant(x, *args), torch.ops.longtune.rotate_fake_quant(x, *args)
    )
    z = torch.zeros(2, 64)
    assert torch.equal(EMU.rotate_fake_quant(z, *args), z)


def test_errors():
    with pytest.raises(RuntimeError, match="bits must be 2, 3, 4 or 8"):
        EMU.rotate_fake_quant(torch.randn(2, 64), 5, "per_token", 0, True, 1.0, True, 0, "identity")
    with pytest.raises(RuntimeError, match="needs .* bytes .* use a larger group_size"):
        EMU.rotate_fake_quant(
            torch.randn(1, 32768), 4, "per_group", 1, True, 1.0, False, 0, "identity"
        )


# Grid cap: one or two blocks for every row, so each block quantizes several rows through the same
# shared memory (rotated values, group scales); the results are those of the uncapped launch, bit
# for bit, which equal the rotation followed by the reference quantizer.
@pytest.mark.parametrize("cap", [1, 2])
@pytest.mark.parametrize(
    "case",
    [(2048, 128, "per_group", 64), (12 * 8, 0, "per_group", 8), (20 * 64, 0, "per_token", 0)],
)
def test_grid_cap(case, cap):
    n, hs, gran, gsz = case
    with emulator_grid_cap(cap):
        C.check_fused_equals_rotation_then_reference(
            EMU,
            EMU.hadamard_transform,
            "cpu",
            n,
            hs,
            gran,
            gsz,
            cap == 1,
            4,
            torch.bfloat16,
            rows=3,
        )
        C.check_ste(EMU, EMU.hadamard_transform_backward, "cpu", n, hs, gran, gsz, True, "clip")
