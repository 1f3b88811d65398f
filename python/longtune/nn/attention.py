"""Attention modules on ``longtune.sparse_attention``.

- :class:`S2Attention`: the attention *core* (q, k, v after rotary -> output), LongLoRA's shifted
  sparse attention while training, full causal attention in eval (``s2_in_eval=False``).
- :class:`SparseQueryAttention`: a full attention block with fewer query heads than the baseline
  (SQA), GQA/MQA key/value sharing, optional rotary embedding, and factory helpers for the SQA
  variants (``sqa``, ``ssqa``, ``xsqa``, ``xsmqa``, ``rsqa``) relative to a baseline head count.
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch
from torch import nn

from ..ops.attention import sparse_attention
from ..ops.mask import AttentionMask


def s2_group_size(seqlen: int, ratio: float) -> int:
    """LongLoRA's group size for a sequence of ``seqlen`` tokens: int(seqlen * ratio) rounded down
    to an even number (the shift is half a group), at least 2."""
    g = int(seqlen * ratio)
    g -= g % 2
    return max(2, g)


def check_s2_options(
    caller: str, group_size_ratio: float, mode: str, group_size: Optional[int] = None
) -> None:
    """Validates LongLoRA's options (``group_size_ratio`` in (0, 1]; ``mode`` and a fixed
    ``group_size`` as :class:`AttentionMask` accepts them), errors prefixed with ``caller``."""
    if not 0 < group_size_ratio <= 1:
        raise ValueError(f"{caller}: group_size_ratio must be in (0, 1], got {group_size_ratio}")
    try:
        AttentionMask(s2_group_size=2 if group_size is None else group_size, s2_mode=mode)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{caller}: mode={mode!r}, group_size={group_size!r}: {e}") from None


def s2_mask(
    *,
    training: bool,
    s2_in_eval: bool,
    mode: str,
    group_size: Optional[int],
    group_size_ratio: float,
    seqlen: Union[int, Callable[[], int]],
    causal: bool = True,
) -> AttentionMask:
    """LongLoRA's rule (shared by :class:`S2Attention` and ``longtune.patch(model,
    attention="s2")``):
    S^2-Attn while training (or always with ``s2_in_eval``) with groups of ``group_size``, else of
    ``s2_group_size(seqlen, group_size_ratio)``; plain (causal) attention in eval -- LongLoRA trains
    sparse and infers dense. ``seqlen``: an int or a function returning it (called only when the
    group size is taken from the ratio)."""
    if not (training or s2_in_eval):
        return AttentionMask(causal=causal)
    g = group_size or s2_group_size(seqlen() if callable(seqlen) else seqlen, group_size_ratio)
    return AttentionMask(causal=causal, s2_group_size=g, s2_mode=mode)


class S2Attention(nn.Module):
    """Shifted sparse attention core (LongLoRA S^2-Attn), a drop-in for the softmax(QK^T)V step.

    ``forward(q, k, v)`` with q (B, N, H_q, D), k/v (B, N, H_kv, D) after rotary embedding (or
    packed (T, H, D) with ``cu_seqlens``); returns (B, N, H, D). In training, tokens attend
    causally inside groups of ``G = group_size`` (or ``group_size_ratio * N``) and the second half
    of the heads is shifted by G/2 (``mode="leakfree"``: no token sees a later one;
    ``"longlora_roll"``: LongLoRA's torch.roll formulation, whose last group wraps around). In eval
    (unless ``s2_in_eval``), full causal attention -- LongLoRA trains sparse and infers dense.
    Packed input with a ratio takes G from the longest sequence: ``max_seqlen``, else read from
    ``cu_seqlens`` (eager only; under torch.compile pass ``max_seqlen`` or a fixed ``group_size``).
    ``softcap``: logit softcapping of the scores (c * tanh(s / c), as Gemma-2), in train and eval.
    """

    def __init__(
        self,
        group_size_ratio: float = 0.25,
        mode: str = "leakfree",
        s2_in_eval: bool = False,
        causal: bool = True,
        group_size: Optional[int] = None,
        softmax_scale: Optional[float] = None,
        softcap: Optional[float] = None,
    ):
        super().__init__()
        check_s2_options("S2Attention", group_size_ratio, mode, group_size)
        self.group_size_ratio = group_size_ratio
        self.mode = mode
        self.s2_in_eval = s2_in_eval
        self.causal = causal
        self.group_size = group_size
        self.softmax_scale = softmax_scale
        if softcap is not None and not softcap >= 0:
            raise ValueError(
                f"S2Attention: softcap must be > 0 (or None for no capping), got {softcap}"
            )
        self.softcap = softcap or None

    def extra_repr(self) -> str:
        g = (
            f"group_size={self.group_size}"
            if self.group_size
            else f"group_size_ratio={self.group_size_ratio}"
        )
        cap = f", softcap={self.softcap}" if self.softcap else ""
        return f"{g}, mode={self.mode!r}, s2_in_eval={self.s2_in_eval}, causal={self.causal}{cap}"

    def forward(self, q, k, v, key_padding_mask=None, cu_seqlens=None, max_seqlen=None):
        mask = s2_mask(
            training=self.training,
            s2_in_eval=self.s2_in_eval,
            mode=self.mode,
            group_size=self.group_size,
            group_size_ratio=self.group_size_ratio,
            causal=self.causal,
            seqlen=lambda: self._longest(q, cu_seqlens, max_seqlen),
        )
        return sparse_attention(
            q,
            k,
            v,
            mask=mask,
            softmax_scale=self.softmax_scale,
            key_padding_mask=key_padding_mask,
            cu_seqlens=cu_seqlens,
            max_seqlen=max_seqlen,
            softcap=self.softcap,
        )

    @staticmethod
    def _longest(q, cu_seqlens, max_seqlen) -> int:
        """The sequence length the group size is taken from: N, or the longest packed sequence."""
        if cu_seqlens is None:
            return q.shape[1]
        if max_seqlen:
            return int(max_seqlen)
        if torch.compiler.is_compiling():
            # the kernel's group size is a plain int; a compiled graph cannot read it from data
            raise ValueError(
                "S2Attention: with cu_seqlens under torch.compile, pass max_seqlen (the longest "
                "sequence) or construct the module with a fixed group_size"
            )
        return int((cu_seqlens[1:] - cu_seqlens[:-1]).max())


def apply_rotary(x: torch.Tensor, positions: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """Rotary position embedding (rotate-half convention, as in Llama) of x (B, N, H, D) at integer
    ``positions`` (N,)."""
    d = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d))
    ang = positions.to(torch.float32)[:, None] * inv[None]
    cos = torch.cat([ang.cos(), ang.cos()], -1)[None, :, None].to(x.dtype)
    sin = torch.cat([ang.sin(), ang.sin()], -1)[None, :, None].to(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * cos + torch.cat([-x2, x1], -1) * sin


class SparseQueryAttention(nn.Module):
    """Sparse Query Attention block: W_q: d -> H_q * d_h, W_k / W_v: d -> H_kv * d_h,
    attention through ``longtune.sparse_attention`` (any mask it supports: causal, S^2 groups,
    window / Lambda-mask), W_o: H * d_h -> d with H = max(H_q, H_kv).

    With H_q < H_kv (rSQA) the query heads are tiled over the key/value heads as in the SQA
    authors' code (RxNN), so the output has H_kv heads and W_o takes H_kv * d_h inputs. Score FLOPs
    scale with H = max(H_q, H_kv): H/H_q-fold fewer than MHA with ``num_heads`` heads when
    H_kv <= H_q.

    ``softcap``: logit softcapping of the attention scores (c * tanh(s / c), as Gemma-2).

    ``forward(x, key_padding_mask=None, positions=None)`` with x (B, N, d_model).
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        num_query_heads: int,
        num_kv_heads: int,
        head_dim: Optional[int] = None,
        *,
        bias: bool = False,
        rotary: bool = True,
        rope_theta: float = 10000.0,
        causal: bool = True,
        s2_group_size: Optional[int] = None,
        s2_mode: str = "leakfree",
        window=None,
        n_global: int = 0,
        softcap: Optional[float] = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if head_dim is None:
            if num_heads < 1 or d_model % num_heads:
                raise ValueError(
                    f"SparseQueryAttention: d_model={d_model} is not divisible by "
                    f"num_heads={num_heads} (or pass head_dim)"
                )
            head_dim = d_model // num_heads
        if head_dim < 1:
            raise ValueError(f"SparseQueryAttention: head_dim must be >= 1, got {head_dim}")
        if num_query_heads < 1 or num_kv_heads < 1:
            raise ValueError(
                "SparseQueryAttention: num_query_heads and num_kv_heads must be >= 1, got "
                f"{num_query_heads} and {num_kv_heads}"
            )
        if num_query_heads % num_kv_heads and num_kv_heads % num_query_heads:
            raise ValueError(
                f"SparseQueryAttention: num_query_heads={num_query_heads} and num_kv_heads="
                f"{num_kv_heads} must divide one another"
            )
        if softcap is not None and not softcap >= 0:
            raise ValueError(
                f"SparseQueryAttention: softcap must be > 0 (or None for no capping), got {softcap}"
            )
        if rotary and head_dim % 2:
            raise ValueError(
                f"SparseQueryAttention: rotary embedding needs an even head_dim, got {head_dim}"
            )
        kw = dict(device=device, dtype=dtype)
        self.d_model, self.num_heads, self.head_dim = d_model, num_heads, head_dim
        self.num_query_heads, self.num_kv_heads = num_query_heads, num_kv_heads
        self.out_heads = max(num_query_heads, num_kv_heads)
        self.q_proj = nn.Linear(d_model, num_query_heads * head_dim, bias=bias, **kw)
        self.k_proj = nn.Linear(d_model, num_kv_heads * head_dim, bias=bias, **kw)
        self.v_proj = nn.Linear(d_model, num_kv_heads * head_dim, bias=bias, **kw)
        self.o_proj = nn.Linear(self.out_heads * head_dim, d_model, bias=bias, **kw)
        self.rotary, self.rope_theta = rotary, rope_theta
        self.attn_kwargs = dict(
            causal=causal,
            s2_group_size=s2_group_size,
            s2_mode=s2_mode,
            window=window,
            n_global=n_global,
            softcap=softcap or None,
        )

    # ---- the SQA variants, relative to a baseline of `num_heads` heads
    VARIANTS = ("mha", "gqa", "mqa", "sqa", "ssqa", "xsqa", "xsmqa", "rsqa")

    @staticmethod
    def variant_heads(variant: str, num_heads: int, num_query_heads: Optional[int] = None):
        """(H_q, H_kv) of a named variant for a baseline of ``num_heads`` heads: mha (H, H), gqa
        (H, H/4), mqa (H, 1), sqa (H/2, H/4), ssqa (H/2, H/2), xsqa (H/4, H/4; or the given
        H_q <= H/4), xsmqa (H/4, 1), rsqa (H/4, H/2: fewer query than key/value heads)."""
        h = num_heads
        if h < 4 or h % 4:
            raise ValueError(f"SQA variants need a baseline head count divisible by 4, got {h}")
        table = {
            "mha": (h, h),
            "gqa": (h, h // 4),
            "mqa": (h, 1),
            "sqa": (h // 2, h // 4),
            "ssqa": (h // 2, h // 2),
            "xsqa": (h // 4, h // 4),
            "xsmqa": (h // 4, 1),
            "rsqa": (h // 4, h // 2),
        }
        if variant not in table:
            raise ValueError(
                f"unknown SQA variant {variant!r}; one of {SparseQueryAttention.VARIANTS}"
            )
        hq, hkv = table[variant]
        if num_query_heads is not None and variant in ("xsqa", "xsmqa"):
            if num_query_heads > h // 4:
                raise ValueError(
                    f"{variant}: num_query_heads must be <= H/4 = {h // 4}, got {num_query_heads}"
                )
            hq = num_query_heads
            hkv = hq if variant == "xsqa" else 1
        return hq, hkv

    @classmethod
    def from_variant(
        cls, variant: str, d_model: int, num_heads: int, **kwargs
    ) -> "SparseQueryAttention":
        hq, hkv = cls.variant_heads(variant, num_heads, kwargs.pop("num_query_heads", None))
        return cls(d_model, num_heads, hq, hkv, **kwargs)

    @classmethod
    def sqa(cls, d_model, num_heads, **kw):
        return cls.from_variant("sqa", d_model, num_heads, **kw)

    @classmethod
    def ssqa(cls, d_model, num_heads, **kw):
        return cls.from_variant("ssqa", d_model, num_heads, **kw)

    @classmethod
    def xsqa(cls, d_model, num_heads, **kw):
        return cls.from_variant("xsqa", d_model, num_heads, **kw)

    @classmethod
    def xsmqa(cls, d_model, num_heads, **kw):
        return cls.from_variant("xsmqa", d_model, num_heads, **kw)

    @classmethod
    def rsqa(cls, d_model, num_heads, **kw):
        return cls.from_variant("rsqa", d_model, num_heads, **kw)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, num_heads={self.num_heads}, "
            f"num_query_heads={self.num_query_heads}, num_kv_heads={self.num_kv_heads}, "
            f"head_dim={self.head_dim}, rotary={self.rotary}"
        )

    def forward(
        self,
        x: torch.Tensor,
        key_padding_mask: Optional[torch.Tensor] = None,
        positions: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(
                f"SparseQueryAttention: x must be (batch, seqlen, {self.d_model}), got "
                f"{tuple(x.shape)}"
            )
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.num_query_heads, self.head_dim)
        k = self.k_proj(x).view(b, n, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, n, self.num_kv_heads, self.head_dim)
        if self.rotary:
            pos = positions if positions is not None else torch.arange(n, device=x.device)
            q, k = apply_rotary(q, pos, self.rope_theta), apply_rotary(k, pos, self.rope_theta)
        out = sparse_attention(q, k, v, key_padding_mask=key_padding_mask, **self.attn_kwargs)
        return self.o_proj(out.reshape(b, n, self.out_heads * self.head_dim))
