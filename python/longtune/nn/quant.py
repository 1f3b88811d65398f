"""``RotatedQuantLinear``: a linear layer trained quantization-aware with rotations (RoSTE-style).

``act_bits`` / ``weight_bits`` = None switch that quantizer off. ``prerotated_weight=True`` says the
stored weight already is ``W R^T`` (rotation merged offline, as ``longtune.quant.prepare_roste``
does for R4): only the input is rotated online. ``weight_is_quantized=True`` (set by the export
loader) says the stored weight already is the dequantized integer weight.

``y = Q_a(R x) @ Q_w(W R^T)^T + b``: the input is rotated by the orthonormal Hadamard R and
fake-quantized per token (one fused kernel); the weight is rotated once (R is orthogonal, so
without quantization the layer computes exactly ``x @ W^T + b``) and fake-quantized per output
channel or per group. While the weight is frozen (LoRA / peft, evaluation) the rotated weight is
computed once and cached; the cache is dropped when the weight changes (version counter, storage, or
a 1024-entry fingerprint that catches `.data` edits such as peft's merge). A trainable weight is
rotated differentiably on every forward. Gradients reach ``weight`` through the straight-through
estimators.

State dict: ``weight``, ``bias`` and ``_extra_state``, the quantizer configuration and the
``prerotated_weight`` / ``weight_is_quantized`` flags as UTF-8 JSON in a uint8 tensor (a tensor, so
that safetensors and ``save_pretrained`` store it); loading it sets them on the module.
"""

from __future__ import annotations

import json

import torch
from torch import nn

from ..ops.hadamard import hadamard_transform
from ..ops.quant import rotate_fake_quant


class RotatedQuantLinear(nn.Linear):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        act_bits: int = 4,
        weight_bits: int = 4,
        weight_group_size: int | None = None,
        act_clip_ratio: float = 1.0,
        weight_clip_ratio: float = 1.0,
        act_symmetric: bool = True,
        weight_symmetric: bool = True,
        rotate: bool = True,
        hadamard_size: int | None = None,
        ste: str = "identity",
        prerotated_weight: bool = False,
        device=None,
        dtype=None,
    ):
        # an nn.Linear subclass: peft (LoRA & co.) and other Linear-aware tools accept it
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.act_bits, self.weight_bits = act_bits, weight_bits
        self.weight_group_size = weight_group_size
        self.act_clip_ratio, self.weight_clip_ratio = act_clip_ratio, weight_clip_ratio
        self.act_symmetric, self.weight_symmetric = act_symmetric, weight_symmetric
        self.rotate, self.hadamard_size, self.ste = rotate, hadamard_size, ste
        self.prerotated_weight = prerotated_weight
        self.weight_is_quantized = False
        self._cache = None  # ((weight version, data_ptr), fingerprint, rotated weight)
        if rotate:
            # fail early, with the Hadamard op's message, when in_features has no supported factor
            hadamard_transform(torch.zeros(1, hadamard_size or in_features), 1.0)

    _STATE_FIELDS = (
        "act_bits",
        "weight_bits",
        "weight_group_size",
        "act_clip_ratio",
        "weight_clip_ratio",
        "act_symmetric",
        "weight_symmetric",
        "rotate",
        "hadamard_size",
        "ste",
        "prerotated_weight",
        "weight_is_quantized",
    )

    def get_extra_state(self) -> torch.Tensor:
        cfg = {"format_version": 1, **{k: getattr(self, k) for k in self._STATE_FIELDS}}
        return torch.tensor(list(json.dumps(cfg, sort_keys=True).encode()), dtype=torch.uint8)

    def set_extra_state(self, state) -> None:
        if torch.is_tensor(state):
            state = json.loads(bytes(state.to(torch.uint8).cpu().tolist()).decode())
        if not isinstance(state, dict):
            raise TypeError(
                f"RotatedQuantLinear: unreadable _extra_state of type {type(state).__name__}"
            )
        unknown = set(state) - set(self._STATE_FIELDS) - {"format_version"}
        if unknown:
            raise ValueError(
                f"RotatedQuantLinear: unknown fields {sorted(unknown)} in _extra_state"
            )
        for k in self._STATE_FIELDS:
            if k in state:
                setattr(self, k, state[k])
        self._cache = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs) -> "RotatedQuantLinear":
        m = cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            device=linear.weight.device,
            dtype=linear.weight.dtype,
            **kwargs,
        )
        with torch.no_grad():
            m.weight.copy_(linear.weight)
            if linear.bias is not None:
                m.bias.copy_(linear.bias)
        return m

    def _rotate_weight(self, w: torch.Tensor) -> torch.Tensor:
        # W R^T: rows of W rotated like activations (block-diagonal when hadamard_size is set)
        h = self.hadamard_size or self.in_features
        return hadamard_transform(w.reshape(self.out_features, self.in_features // h, h)).reshape(
            w.shape
        )

    def rotated_weight(self) -> torch.Tensor:
        if not self.rotate or self.prerotated_weight:
            return self.weight
        if torch.is_grad_enabled() and self.weight.requires_grad:
            return self._rotate_weight(self.weight)  # differentiable path for training
        if torch.compiler.is_compiling():  # in a graph: rotated there (the cache compares data)
            return self._rotate_weight(self.weight.detach())
        with torch.no_grad():
            key = (self.weight._version, self.weight.data_ptr())
            fp = self._fingerprint()
            if self._cache is None or self._cache[0] != key or not torch.equal(self._cache[1], fp):
                self._cache = (key, fp, self._rotate_weight(self.weight))
        return self._cache[2]

    def _fingerprint(self) -> torch.Tensor:
        # autograd's version counter misses in-place edits through `.data` (peft's LoRA merge does
        # that): up to 1024 evenly strided entries catch any dense update such as a merged delta
        flat = self.weight.detach().reshape(-1)
        step = max(1, flat.numel() // 1024)
        return flat[::step].clone()

    def invalidate_rotation_cache(self) -> None:
        """Forget the cached rotated weight (after sparse in-place edits the fingerprint may
        miss)."""
        self._cache = None

    def quantized_weight(self) -> torch.Tensor:
        w = self.rotated_weight()
        if self.weight_bits is None or self.weight_is_quantized:
            return w
        return rotate_fake_quant(
            w,
            bits=self.weight_bits,
            granularity="per_group" if self.weight_group_size else "per_token",
            group_size=self.weight_group_size,
            symmetric=self.weight_symmetric,
            clip_ratio=self.weight_clip_ratio,
            rotate=False,
            ste=self.ste,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_bits is None:
            xq = (
                hadamard_transform(
                    x.reshape(*x.shape[:-1], -1, self.hadamard_size or self.in_features)
                ).reshape(x.shape)
                if self.rotate
                else x
            )
        else:
            xq = rotate_fake_quant(
                x,
                bits=self.act_bits,
                symmetric=self.act_symmetric,
                clip_ratio=self.act_clip_ratio,
                rotate=self.rotate,
                hadamard_size=self.hadamard_size,
                ste=self.ste,
            )
        return nn.functional.linear(xq, self.quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, W{self.weight_bits}A{self.act_bits}, "
            f"rotate={self.rotate}, prerotated_weight={self.prerotated_weight}, ste={self.ste!r}"
        )
