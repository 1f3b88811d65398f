"""Fragment layouts of mma.sync / ldmatrix and shuffle semantics, written from the PTX ISA and CUDA
C++ Programming Guide text independently of csrc/emu. The same checks run on the emulator (CPU
tensors, tests/test_emu_layouts.py) and on a GPU (tests/cuda/test_probes_cuda.py)."""

import torch

MMA_F16_16816, MMA_BF16_16816, MMA_F16_1688 = 0, 1, 2


# ---- PTX ISA "Matrix Fragments for mma.m16n8k16 with floating point type"
def a_16816(lane, i):  # element a_i (i in 0..7) of lane -> (row, col) of A (16 x 16)
    g, t = lane // 4, lane % 4
    row = g if (i < 2 or 4 <= i < 6) else g + 8
    col = t * 2 + (i & 1) + (8 if i >= 4 else 0)
    return row, col


def b_16816(lane, i):  # b_i (i in 0..3) -> (row, col) of B (16 x 8)
    g, t = lane // 4, lane % 4
    return t * 2 + (i & 1) + (8 if i >= 2 else 0), g


# ---- "Matrix Fragments for mma.m16n8k8" (f16)
def a_1688(lane, i):  # a_i (i in 0..3) -> (row, col) of A (16 x 8)
    g, t = lane // 4, lane % 4
    return (g if i < 2 else g + 8), t * 2 + (i & 1)


def b_1688(lane, i):  # b_i (i in 0..1) -> (row, col) of B (8 x 8)
    g, t = lane // 4, lane % 4
    return t * 2 + (i & 1), g


def c_16n8(lane, i):  # c_i / d_i (i in 0..3) -> (row, col) of C, D (16 x 8), both shapes
    g, t = lane // 4, lane % 4
    return (g if i < 2 else g + 8), t * 2 + (i & 1)


def _bits16(v: torch.Tensor, bf: bool) -> torch.Tensor:
    return v.to(torch.bfloat16 if bf else torch.float16).view(torch.int16).to(torch.int64) & 0xFFFF


def _pack(lo, hi):
    return lo | (hi << 16)


def run_mma_case(kind: int, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    K = 8 if kind == MMA_F16_1688 else 16
    bf = kind == MMA_BF16_16816
    # small integers: every product and sum is exact in fp32, so the comparison is exact
    A = torch.randint(-8, 9, (16, K), generator=g).double()
    B = torch.randint(-8, 9, (K, 8), generator=g).double()
    C = torch.randint(-64, 65, (16, 8), generator=g).double()
    a_map = a_1688 if K == 8 else a_16816
    b_map = b_1688 if K == 8 else b_16816
    Ab, Bb = _bits16(A, bf), _bits16(B, bf)
    frags = torch.zeros(32, 10, dtype=torch.int64)
    for lane in range(32):
        for r in range(K // 4):  # A registers: (a_{2r}, a_{2r+1})
            lo, hi = a_map(lane, 2 * r), a_map(lane, 2 * r + 1)
            frags[lane, r] = _pack(Ab[lo], Ab[hi])
        for r in range(K // 8):  # B registers: (b_{2r}, b_{2r+1})
            lo, hi = b_map(lane, 2 * r), b_map(lane, 2 * r + 1)
            frags[lane, 4 + r] = _pack(Bb[lo], Bb[hi])
        for i in range(4):
            frags[lane, 6 + i] = (
                torch.tensor([C[c_16n8(lane, i)]], dtype=torch.float32).view(torch.int32).item()
                & 0xFFFFFFFF
            )
    frags32 = torch.where(frags >= 2**31, frags - 2**32, frags).to(torch.int32)
    d = torch.ops.longtune_test.mma_probe(frags32.to(device), kind).cpu().double()
    D = torch.full((16, 8), float("nan"), dtype=torch.float64)
    for lane in range(32):
        for i in range(4):
            D[c_16n8(lane, i)] = d[lane, i]
    torch.testing.assert_close(D, A @ B + C, rtol=0, atol=0)


# ---- PTX ISA "ldmatrix": lanes 8i..8i+7 give the row addresses of matrix i; without .trans
# thread t receives row t/4, elements 2(t%4) and 2(t%4)+1 of each matrix (one 32-bit register
# per matrix); with .trans it receives elements (2(t%4), t/4) and (2(t%4)+1, t/4).
def run_ldmatrix_case(nmat: int, trans: bool, device: str):
    stride = 24  # elements per tile row: 48 bytes, keeps every row address 16-byte aligned
    tile = torch.arange(8 * nmat * stride, dtype=torch.int64) * 7 % 32749  # distinct values
    tile16 = torch.where(tile >= 2**15, tile - 2**16, tile).to(torch.int16)
    rows = torch.zeros(32, dtype=torch.int32)
    for lane in range(32):
        m, j = (lane // 8) % nmat, lane % 8  # lanes beyond 8*nmat: any valid address
        rows[lane] = (m * 8 + j) * stride
    out = torch.ops.longtune_test.ldmatrix_probe(
        tile16.to(device), rows.to(device), nmat, trans
    ).cpu()

    def M(i, r, c):
        return int(tile[(i * 8 + r) * stride + c])

    for t in range(32):
        for i in range(nmat):
            if trans:
                lo, hi = M(i, 2 * (t % 4), t // 4), M(i, 2 * (t % 4) + 1, t // 4)
            else:
                lo, hi = M(i, t // 4, 2 * (t % 4)), M(i, t // 4, 2 * (t % 4) + 1)
            assert int(out[t, i]) == lo | (hi << 16), f"lane {t} matrix {i} trans={trans}"


# ---- CUDA C++ Programming Guide, "Warp Shuffle Functions"
def expected_shuffle(kind: str, values, args, width):
    out = []
    for lane in range(32):
        base = lane - lane % width
        if kind == "idx":
            src = base + args[lane] % width
        elif kind == "xor":
            src = lane ^ args[lane]
            if src >= base + width:  # later groups are out of reach: own value
                src = lane
        elif kind == "up":
            src = lane - args[lane]
            if src < base:
                src = lane
        else:
            src = lane + args[lane]
            if src >= base + width:
                src = lane
        out.append(values[src])
    return out


SHFL_KINDS = {"idx": 0, "xor": 1, "up": 2, "down": 3}


def run_shuffle_case(kind: str, width: int, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    values = torch.randint(-1000, 1000, (32,), generator=g, dtype=torch.int32)
    if kind == "idx":
        args = torch.randint(0, 64, (32,), generator=g, dtype=torch.int32)
    elif kind == "xor":
        args = torch.full((32,), int(torch.randint(1, 32, (1,), generator=g)), dtype=torch.int32)
    else:
        args = torch.full(
            (32,), int(torch.randint(0, width + 1, (1,), generator=g)), dtype=torch.int32
        )
    out = torch.ops.longtune_test.shfl_probe(
        values.to(device), args.to(device), SHFL_KINDS[kind], width
    ).cpu()
    assert out.tolist() == expected_shuffle(kind, values.tolist(), args.tolist(), width)


def run_ballot_case(device: str):
    preds = torch.tensor([(i * 7) % 3 == 0 for i in range(32)], dtype=torch.int32)
    out = torch.ops.longtune_test.shfl_probe(
        preds.to(device), torch.zeros(32, dtype=torch.int32).to(device), 4, 32
    ).cpu()
    expected = sum(1 << i for i in range(32) if preds[i])
    assert all((int(v) & 0xFFFFFFFF) == expected for v in out)
