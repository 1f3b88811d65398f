"""``AttentionMask``: the mask of ``longtune.sparse_attention`` as one validated value.

The ops ``torch.ops.longtune.sparse_attention_fwd/_bwd`` (and ``attention_mask_ranges``) take it as
one ``int[] mask`` argument, :meth:`AttentionMask.to_list` (layout ``MaskSlot`` in
csrc/common/attn_mask.h, parsed once in C++ into ``MaskSpec``). The semantics of every field are
those of :mod:`longtune.reference.attention`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch

S2_MODES = ("none", "leakfree", "longlora_roll")
_MODE_CODE = {"none": 0, "leakfree": 1, "longlora_roll": 2}
MASK_VERSION = 1
MASK_LEN = 11  # version + 10 fields


def _int(name: str, value, *, none=None) -> int:
    if value is None and none is not None:
        return none
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, torch.SymInt))
        and not hasattr(value, "__index__")
    ):
        raise TypeError(f"longtune.AttentionMask: {name} must be an int, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class AttentionMask:
    """Which keys each query of ``longtune.sparse_attention`` sees (frozen, validated on
    construction).

    - ``causal``: key position pk visible to query position pq only if pk <= pq.
    - ``s2_group_size`` G (0: no S^2): LongLoRA S^2-Attn, attention inside groups of G positions;
      the second half of the heads is shifted by G/2. ``s2_mode``: ``"leakfree"`` (the default when
      G >
      0; no token sees a later one) or ``"longlora_roll"`` (LongLoRA's torch.roll formulation, whose
      last shifted group wraps around); ``"none"`` iff G == 0 (a mode given with G == 0 is
      normalised to ``"none"``).
    - ``window_left`` / ``window_right`` (< 0 or None: unbounded): visible iff pq - pk < window_left
      (unless the key is one of the ``n_global`` global tokens, positions [0, n_global)) and
      pk - pq < window_right.
    - ``q_offset`` (< 0 or None: bottom-right alignment, the queries are the last nq of the keys'
      positions): query i sits at key index q_offset + i. ``kv_offset``: the position of key 0; it
      may be negative (keys before the local queries' first position, e.g. the halo rows of a
      neighbouring shard of the sequence).
    - ``head_offset`` / ``total_heads`` (0: the call's own heads are all of them): the call holds
      output heads [head_offset, head_offset + H) of ``total_heads``; the S^2 shift applies to the
      global heads >= total_heads // 2, so a head-parallel shard computes exactly its slice of the
      full attention.
    """

    causal: bool = True
    s2_group_size: int = 0
    s2_mode: Optional[str] = None
    window_left: Optional[int] = -1
    window_right: Optional[int] = -1
    n_global: int = 0
    q_offset: Optional[int] = -1
    kv_offset: int = 0
    head_offset: int = 0
    total_heads: int = 0

    def __post_init__(self):
        def put(name, value):
            object.__setattr__(self, name, value)

        if not isinstance(self.causal, bool):
            raise TypeError(f"longtune.AttentionMask: causal must be a bool, got {self.causal!r}")
        g = _int("s2_group_size", self.s2_group_size, none=0)
        mode = self.s2_mode
        if mode is not None and mode not in S2_MODES:
            raise ValueError(
                f"longtune.AttentionMask: s2_mode must be one of {S2_MODES[1:]} (or 'none' without "
                f"S^2), got {mode!r}"
            )
        if g != 0 and (g < 2 or g % 2):
            raise ValueError(
                "longtune.AttentionMask: s2_group_size must be an even number >= 2 (the shift is "
                f"half a group) or 0 (no S^2), got {self.s2_group_size}"
            )
        if g == 0:
            mode = "none"
        elif mode is None:
            mode = "leakfree"
        elif mode == "none":
            raise ValueError(
                f"longtune.AttentionMask: s2_group_size={g} needs s2_mode 'leakfree' or "
                f"'longlora_roll' (got 'none')"
            )
        put("s2_group_size", g)
        put("s2_mode", mode)
        for name in ("window_left", "window_right"):
            w = _int(name, getattr(self, name), none=-1)
            if w == 0:
                raise ValueError(
                    f"longtune.AttentionMask: {name} must be >= 1 (or < 0 / None: unbounded), got 0"
                )
            put(name, -1 if w < 0 else w)
        ng = _int("n_global", self.n_global)
        if ng < 0:
            raise ValueError(f"longtune.AttentionMask: n_global must be >= 0, got {ng}")
        put("n_global", ng)
        qo = _int("q_offset", self.q_offset, none=-1)
        put("q_offset", -1 if qo < 0 else qo)
        put("kv_offset", _int("kv_offset", self.kv_offset))
        ho, th = _int("head_offset", self.head_offset), _int("total_heads", self.total_heads)
        if ho < 0 or th < 0:
            raise ValueError(
                f"longtune.AttentionMask: head_offset and total_heads must be >= 0, got {ho} and "
                f"{th}"
            )
        if ho > 0 and th == 0:
            raise ValueError(
                f"longtune.AttentionMask: head_offset={ho} needs total_heads (the global number of "
                f"heads)"
            )
        if th and ho >= th:
            raise ValueError(
                f"longtune.AttentionMask: head_offset must be < total_heads, got {ho} and {th}"
            )
        put("head_offset", ho)
        put("total_heads", th)
        if mode == "longlora_roll" and (
            self.window_left >= 0
            or self.window_right >= 0
            or ng
            or self.kv_offset
            or self.q_offset > 0
        ):
            raise ValueError(
                "longtune.AttentionMask: s2_mode='longlora_roll' reproduces LongLoRA's torch.roll "
                "formulation and takes no window, n_global or offsets (use 'leakfree')"
            )

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def from_keywords(
        cls,
        causal=True,
        s2_group_size=None,
        s2_mode="leakfree",
        window=None,
        n_global=0,
        q_offset=None,
        kv_offset=0,
        head_offset=0,
        total_heads=0,
    ) -> "AttentionMask":
        """From ``longtune.sparse_attention``'s keyword arguments (``s2_group_size=None``: no S^2,
        then ``s2_mode`` is not read; ``window``: None, an int w (= (w, None)) or a (left, right)
        pair)."""
        if window is None:
            wl, wr = -1, -1
        elif isinstance(window, int) and not isinstance(window, bool):
            if window < 1:
                raise ValueError(f"longtune.AttentionMask: window must be >= 1, got {window}")
            wl, wr = window, -1
        else:
            try:
                left, right = window
            except (TypeError, ValueError):
                raise ValueError(
                    f"longtune.AttentionMask: window must be an int, a (left, right) pair or None, "
                    f"got {window!r}"
                ) from None
            if left is not None and int(left) < 1 or right is not None and int(right) < 1:
                raise ValueError(
                    f"longtune.AttentionMask: window sizes must be >= 1, got {window!r}"
                )
            wl, wr = left, right
        if s2_group_size is None:
            g, mode = 0, None
        else:
            g, mode = s2_group_size, s2_mode
            if g == 0:  # the keyword API has no "0 = off": None is off
                raise ValueError(
                    "longtune.AttentionMask: s2_group_size must be an even number >= 2, got 0"
                )
            if mode == "none":
                raise ValueError(
                    f"longtune.AttentionMask: s2_mode must be one of {S2_MODES[1:]}, got 'none'"
                )
        return cls(
            causal=bool(causal),
            s2_group_size=g,
            s2_mode=mode,
            window_left=wl,
            window_right=wr,
            n_global=n_global,
            q_offset=q_offset,
            kv_offset=kv_offset,
            head_offset=head_offset,
            total_heads=total_heads,
        )

    @classmethod
    def from_list(cls, enc) -> "AttentionMask":
        """The inverse of :meth:`to_list`."""
        enc = [int(x) for x in enc]
        if len(enc) != MASK_LEN or enc[0] != MASK_VERSION:
            raise ValueError(
                f"longtune.AttentionMask: an encoded mask has {MASK_LEN} integers and starts with "
                f"the version {MASK_VERSION}, got {enc}"
            )
        modes = {c: m for m, c in _MODE_CODE.items()}
        if enc[1] not in (0, 1) or enc[3] not in modes:
            raise ValueError(f"longtune.AttentionMask: bad encoded causal / s2_mode in {enc}")
        return cls(bool(enc[1]), enc[2], modes[enc[3]], *enc[4:])

    def replace(self, **changes) -> "AttentionMask":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ views
    def to_list(self) -> list:
        """The ops' ``int[] mask`` argument."""
        return [
            MASK_VERSION,
            int(self.causal),
            self.s2_group_size,
            _MODE_CODE[self.s2_mode],
            self.window_left,
            self.window_right,
            self.n_global,
            self.q_offset,
            self.kv_offset,
            self.head_offset,
            self.total_heads,
        ]

    @property
    def window(self):
        """The keyword form: None, an int (left only) or a (left, right) pair with None for
        unbounded."""
        if self.window_left < 0 and self.window_right < 0:
            return None
        if self.window_right < 0:
            return self.window_left
        return (None if self.window_left < 0 else self.window_left, self.window_right)

    def to_keywords(self) -> dict:
        """Keyword arguments of ``longtune.sparse_attention`` / the reference describing this
        mask."""
        kw = dict(
            causal=self.causal,
            window=self.window,
            n_global=self.n_global,
            q_offset=None if self.q_offset < 0 else self.q_offset,
            kv_offset=self.kv_offset,
        )
        if self.s2_group_size:
            kw.update(s2_group_size=self.s2_group_size, s2_mode=self.s2_mode)
        if self.total_heads:
            kw.update(head_offset=self.head_offset, total_heads=self.total_heads)
        return kw

    def shifted(self, head: int, heads: int) -> bool:
        """Whether local output head ``head`` of ``heads`` is in the S^2-shifted half."""
        total = self.total_heads or heads
        return self.head_offset + head >= total // 2
