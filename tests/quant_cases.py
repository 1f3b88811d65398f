"""Shared checks of the rotated-quantization ops for one backend: `ops` is torch.ops.longtune (CPU
or CUDA tensors) or torch.ops.longtune_emu (the emulated CUDA kernel on CPU tensors); `had` is the
matching Hadamard op, so that "fused = rotation followed by the reference quantizer" compares the
same rotated values bit for bit."""

import math

import torch

from longtune.reference import quant as Q

CASES = [  # (n, hadamard_size, granularity, group_size)
    (64, 0, "per_token", 0),
    (4096, 0, "per_token", 0),
    (256, 64, "per_group", 32),
    (2048, 128, "per_group", 64),
    (12 * 8, 0, "per_group", 8),  # m = 12 factor
    (76 * 64, 0, "per_token", 0),  # Qwen2.5 size 4864, m = 76
    (60, 0, "per_token", 0),  # m = 60, 2^0
]


def rotated(x, n, hs, had):
    h = hs if hs > 0 else n
    return had(x.float().reshape(*x.shape[:-1], n // h, h), 1 / math.sqrt(h)).reshape(x.shape)


def check_fused_equals_rotation_then_reference(
    ops, had, device, n, hs, gran, gsz, sym, bits, dtype, rows=3
):
    x = (torch.randn(rows, n) * 3).to(dtype).to(device)
    clip = 0.9
    y = ops.rotate_fake_quant(x, bits, gran, gsz, sym, clip, True, hs, "identity")
    r = rotated(x, n, hs, had).cpu()
    ref = Q.fake_quant(r, bits, gran, gsz or None, sym, clip).to(dtype)
    assert y.dtype == dtype and y.shape == x.shape
    assert torch.equal(y.cpu(), ref), f"max diff {(y.cpu().float() - ref.float()).abs().max()}"
    codes, scales, zeros = ops.rotate_quantize(x, bits, gran, gsz, sym, clip, True, hs)
    cr, sr, zr = Q.quantize(r, bits, gran, gsz or None, sym, clip)
    assert codes.dtype == (torch.int8 if sym else torch.uint8)
    assert torch.equal(codes.cpu().float(), cr)
    assert torch.equal(scales.cpu(), sr.reshape(scales.shape)) and torch.equal(
        zeros.cpu(), zr.reshape(zeros.shape)
    )


def check_plain_quantizer(ops, device, n, gran, gsz, sym, bits, dtype):
    x = (torch.randn(5, n) * 2).to(dtype).to(device)
    y = ops.rotate_fake_quant(x, bits, gran, gsz, sym, 0.8, False, 0, "identity")
    ref = Q.fake_quant(x.cpu().float(), bits, gran, gsz or None, sym, 0.8).to(dtype)
    assert torch.equal(y.cpu(), ref)


def check_ste(ops, had_bwd, device, n, hs, gran, gsz, sym, ste):
    x = (torch.randn(4, n) * 3).to(device)
    g = torch.randn(4, n).to(device)
    gx = ops.rotate_fake_quant_backward(g, x, 4, gran, gsz, sym, 0.7, True, hs, ste)
    h = hs if hs > 0 else n
    if ste == "clip":
        r = rotated(x, n, hs, lambda t, s: ops_hadamard(ops)(t, s)).cpu()
        mask = Q.in_range_mask(r, 4, gran, gsz or None, sym, 0.7)
        gm = torch.where(mask, g.cpu(), torch.zeros(()))
        assert 0 < mask.float().mean() < 1, "the case should clip some elements"
    else:
        gm = g.cpu()
    expect = had_bwd(gm.reshape(4, n // h, h).to(device), 1 / math.sqrt(h)).reshape(4, n).cpu()
    torch.testing.assert_close(gx.cpu(), expect, rtol=0, atol=0)


def ops_hadamard(ops):
    return ops.hadamard_transform
