"""Every op has a schema, a CPU kernel, a CUDA kernel (when built with nvcc - CI forces that) and
an emulated CUDA kernel; fake and autograd kernels are registered from Python."""

import pytest
import torch

import longtune

from .conftest import require_cuda_build

OPS = [
    "hadamard_transform",
    "hadamard_transform_backward",
    "rotate_fake_quant",
    "rotate_fake_quant_backward",
    "rotate_quantize",
    "sparse_delta_grad",
    "sparse_adamw_",
    "sparse_attention_fwd",
    "sparse_attention_bwd",
    "linear_cross_entropy_fwd",
    "linear_cross_entropy_bwd",
    "linear_cross_entropy_fwd_bwd",
]
TEST_OPS = ["mma_probe", "ldmatrix_probe", "shfl_probe"]


def _has(op, key):
    return torch._C._dispatch_has_kernel_for_dispatch_key(op, key)


@pytest.mark.parametrize("op", OPS)
def test_cpu_kernel_registered(op):
    assert _has(f"longtune::{op}", "CPU")


@pytest.mark.parametrize("op", OPS)
def test_cuda_kernel_registered(op):
    if not longtune.has_cuda_kernels():
        if require_cuda_build():
            pytest.fail(
                "LONGTUNE_REQUIRE_CUDA=1 but this build has no CUDA kernels (nvcc missing?)"
            )
        pytest.skip("built without CUDA (LONGTUNE_CUDA=OFF or no nvcc)")
    assert _has(f"longtune::{op}", "CUDA")


def test_mask_ranges_in_the_product_namespace():
    # the FLOP counter's mask math: one implementation for every backend, not a test-only op
    assert _has("longtune::attention_mask_ranges", "CompositeExplicitAutograd")
    assert not hasattr(torch.ops.longtune_test, "attention_mask_ranges")


@pytest.mark.parametrize("op", TEST_OPS)
def test_probe_kernels_registered(op):
    assert _has(f"longtune_test::{op}", "CPU")
    if longtune.has_cuda_kernels():
        assert _has(f"longtune_test::{op}", "CUDA")


@pytest.mark.parametrize("op", OPS)
def test_emulated_kernel_registered(op):
    assert longtune.has_emulator()
    assert _has(f"longtune_emu::{op}", "CPU")


@pytest.mark.parametrize("op", OPS[:2])
def test_fake_and_autograd_registered(op):
    x = torch.empty(2, 16, device="meta")
    y = getattr(torch.ops.longtune, op)(x, 1.0)
    assert y.shape == x.shape and y.device.type == "meta"
    assert _has(f"longtune::{op}", "Autograd") or _has(f"longtune::{op}", "AutogradCPU")


def test_quant_fake_kernels():
    x = torch.empty(3, 64, device="meta")
    y = torch.ops.longtune.rotate_fake_quant(x, 4, "per_token", 0, True, 1.0, True, 0, "identity")
    assert y.shape == x.shape and y.device.type == "meta"
    c, s, z = torch.ops.longtune.rotate_quantize(x, 4, "per_group", 16, False, 1.0, True, 0)
    assert c.dtype == torch.uint8 and s.shape == (3, 4) and z.shape == (3, 4)
