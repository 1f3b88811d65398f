"""Communication layer of :mod:`longtune.distributed`: process-group helpers, waits with a timeout
that name the rank and the operation, the neighbour (halo) exchange, the sequence <-> heads
all-to-all, and a byte counter (:func:`count_comm`)."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 300.0


class CommTimeoutError(RuntimeError):
    """A collective or point-to-point operation of :mod:`longtune.distributed` did not complete
    within its timeout (the message names the rank and the operation)."""


# ------------------------------------------------------------------ process group
def check_initialized(where: str):
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"longtune.distributed.{where}: torch.distributed is not initialized (call "
            f"torch.distributed.init_process_group first, e.g. under torchrun)"
        )


def resolve_group(group, where: str):
    """The process group of ``group``: None (the default group), a ProcessGroup, or a 1-D
    ``DeviceMesh`` (for a dimension of a larger mesh pass ``mesh["sp"]`` or
    ``mesh.get_group("sp")``)."""
    if group is None or isinstance(group, dist.ProcessGroup):
        return group
    if hasattr(group, "get_group") and hasattr(group, "ndim"):
        if group.ndim != 1:
            raise ValueError(
                f"longtune.distributed.{where}: group is a {group.ndim}-D DeviceMesh; pass the "
                f"sequence-parallel dimension, e.g. mesh['sp'] or mesh.get_group('sp')"
            )
        return group.get_group()
    raise TypeError(
        f"longtune.distributed.{where}: group must be None, a ProcessGroup or a 1-D DeviceMesh, "
        f"got {type(group).__name__}"
    )


def group_rank_size(group, where: str):
    """(process group, rank in it, its size); ``group`` as :func:`resolve_group` takes it."""
    check_initialized(where)
    group = resolve_group(group, where)
    return group, dist.get_rank(group), dist.get_world_size(group)


def global_rank(group, rank: int) -> int:
    """The global rank of ``group``'s rank ``rank`` (what isend / irecv take as peer)."""
    if group is None or group is dist.group.WORLD:
        return rank
    return dist.get_global_rank(group, rank)


def as_timedelta(timeout) -> datetime.timedelta:
    if timeout is None:
        timeout = DEFAULT_TIMEOUT_S
    if isinstance(timeout, datetime.timedelta):
        return timeout
    t = float(timeout)
    if not t > 0:  # also NaN
        raise ValueError(f"longtune.distributed: timeout must be > 0 seconds, got {timeout!r}")
    return datetime.timedelta(seconds=t)


def wait_all(works, *, op: str, rank: int, timeout=None):
    """Waits for every work handle of ``op`` at most ``timeout`` (seconds or a timedelta);
    a failure or a timeout raises :class:`CommTimeoutError` naming ``rank`` and ``op``."""
    td = as_timedelta(timeout)
    for w in works:
        try:
            ok = w.wait(td)
        except Exception as e:  # gloo raises on timeout, other backends may return False
            raise CommTimeoutError(
                f"longtune.distributed: rank {rank} did not complete {op} within "
                f"{td.total_seconds():g} s ({type(e).__name__}: {e})"
            ) from e
        if ok is False:
            raise CommTimeoutError(
                f"longtune.distributed: rank {rank} did not complete {op} within "
                f"{td.total_seconds():g} s"
            )


# ------------------------------------------------------------------ byte counter
@dataclasses.dataclass
class CommStats:
    """Bytes this process sent, by operation (``"halo"``, ``"halo_grad"``, ``"all_to_all"``),
    and the number of calls of each."""

    bytes_sent: dict = dataclasses.field(default_factory=dict)
    calls: dict = dataclasses.field(default_factory=dict)

    def total(self, *ops) -> int:
        """Bytes sent by ``ops`` (all operations when none is named)."""
        return sum(v for k, v in self.bytes_sent.items() if not ops or k in ops)


_COUNTERS: list = []


@contextlib.contextmanager
def count_comm():
    """Counts the bytes that :mod:`longtune.distributed` sends from this process inside the block::

    with longtune.distributed.count_comm() as stats:
        out = s2_attention_sp(q, k, v, s2_group_size=G)
    stats.bytes_sent["halo"]
    """
    stats = CommStats()
    _COUNTERS.append(stats)
    try:
        yield stats
    finally:
        _COUNTERS.remove(stats)


def _record(op: str, nbytes: int):
    for c in _COUNTERS:
        c.bytes_sent[op] = c.bytes_sent.get(op, 0) + int(nbytes)
        c.calls[op] = c.calls.get(op, 0) + 1


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


# ------------------------------------------------------------------ neighbour exchange
class RingExchange:
    """One step of a ring exchange, posted at construction and completed by :meth:`wait`: every
    rank r sends ``send`` to rank (r + 1) % W and receives ``recv_shape`` from rank (r - 1) % W
    (``reverse=True``: to r - 1, from r + 1). Every rank posts both operations on every call, with
    empty tensors where there is nothing to move, so no rank waits for a message that is never
    posted."""

    def __init__(
        self, sends, recv_shapes, *, group, rank, world, op, timeout, reverse=False, tag=0
    ):
        self.op, self.rank, self.timeout = op, rank, timeout
        step = -1 if reverse else 1
        dst = global_rank(group, (rank + step) % world)
        src = global_rank(group, (rank - step) % world)
        self.recv, self._keep = [], []  # the send buffers live until the exchange completes
        ops = []
        for t, shape in zip(sends, recv_shapes):
            t = t.contiguous()
            buf = torch.empty(shape, dtype=t.dtype, device=t.device)
            self.recv.append(buf)
            self._keep.append(t)
            ops.append(dist.P2POp(dist.isend, t, dst, group, tag))
            ops.append(dist.P2POp(dist.irecv, buf, src, group, tag))
            _record(op, _nbytes(t))
        self.works = dist.batch_isend_irecv(ops) if ops else []

    def wait(self):
        wait_all(self.works, op=self.op, rank=self.rank, timeout=self.timeout)
        self.works, self._keep = [], None
        return self.recv


# ------------------------------------------------------------------ sequence <-> heads
def all_to_all_dim0(x: torch.Tensor, *, group, rank, op, timeout) -> torch.Tensor:
    """all_to_all_single over dim 0 of ``x`` (W, ...): block w goes to rank w; block w of the
    result came from rank w."""
    x = x.contiguous()
    out = torch.empty_like(x)
    _record(op, _nbytes(x) - _nbytes(x[0]) if x.shape[0] else 0)  # its own block stays
    work = dist.all_to_all_single(out, x, group=group, async_op=True)
    wait_all([work], op=op, rank=rank, timeout=timeout)
    return out


class SeqToHeads(torch.autograd.Function):
    """(B, L, W * n, D) sequence shard, head block w for rank w -> (B, W * L, n, D): all tokens of
    this rank's n heads. The backward is the inverse all-to-all."""

    @staticmethod
    def forward(ctx, x, group, rank, world, timeout):
        ctx.args = (group, rank, world, timeout)
        return seq_to_heads(x, group=group, rank=rank, world=world, timeout=timeout)

    @staticmethod
    def backward(ctx, g):
        group, rank, world, timeout = ctx.args
        return (
            heads_to_seq(g, group=group, rank=rank, world=world, timeout=timeout),
            None,
            None,
            None,
            None,
        )


class HeadsToSeq(torch.autograd.Function):
    """The inverse of :class:`SeqToHeads`: (B, W * L, n, D) -> (B, L, W * n, D)."""

    @staticmethod
    def forward(ctx, x, group, rank, world, timeout):
        ctx.args = (group, rank, world, timeout)
        return heads_to_seq(x, group=group, rank=rank, world=world, timeout=timeout)

    @staticmethod
    def backward(ctx, g):
        group, rank, world, timeout = ctx.args
        return (
            seq_to_heads(g, group=group, rank=rank, world=world, timeout=timeout),
            None,
            None,
            None,
            None,
        )


def seq_to_heads(x, *, group, rank, world, timeout, op="all_to_all"):
    b, n_loc, wh, d = x.shape
    h = wh // world
    blocks = x.reshape(b, n_loc, world, h, d).permute(2, 0, 1, 3, 4)  # (W, B, L, h, D)
    y = all_to_all_dim0(blocks, group=group, rank=rank, op=op, timeout=timeout)
    return y.permute(1, 0, 2, 3, 4).reshape(b, world * n_loc, h, d)


def heads_to_seq(x, *, group, rank, world, timeout, op="all_to_all"):
    b, n, h, d = x.shape
    n_loc = n // world
    blocks = x.reshape(b, world, n_loc, h, d).permute(1, 0, 2, 3, 4)  # (W, B, L, h, D)
    y = all_to_all_dim0(blocks, group=group, rank=rank, op=op, timeout=timeout)
    return y.permute(1, 2, 0, 3, 4).reshape(b, n_loc, world * h, d)
