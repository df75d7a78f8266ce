"""What a layer's attention computes: the semantics that importance and attention statistics must reproduce.

A trace records post-RoPE queries and keys; turning them into attention probabilities needs what the model's
attention function did with them. :class:`AttentionSpec` holds the three things that vary across the supported
model families (the logit scale, a sliding window, logit soft-capping); :class:`Rotary` holds the RoPE frequencies,
for methods that reason about future query positions (Expected Attention). Both are recorded in trace headers,
read from what the model's attention function actually received (:func:`kvp_gym.capture.probe_attention`).

Imports nothing from kvp_gym: the trace format, the kernels and the cache all build on it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AttentionSpec:
    """One layer's attention: probs = softmax over visible keys of softcap(scale * q . k).

    scale: the logit scale (1 / sqrt(head_dim) for most models).
    sliding_window: 0 for full causal attention; W > 0: query t sees key i only if 0 <= t - i < W (transformers'
        sliding-window mask).
    softcap: 0 for none; c > 0: logits become c * tanh(logits / c) (Gemma 2 style soft-capping).
    """

    scale: float
    sliding_window: int = 0
    softcap: float = 0.0

    @classmethod
    def standard(cls, head_dim: int) -> AttentionSpec:
        """Full causal attention scaled by 1 / sqrt(head_dim): what Llama-family models compute."""
        return cls(scale=head_dim**-0.5)

    def logits(self, queries: torch.Tensor, keys_t: torch.Tensor) -> torch.Tensor:
        """softcap(scale * queries @ keys_t), float32. queries [..., T, D], keys_t [..., D, S] -> [..., T, S]."""
        logits = torch.matmul(queries.float() * self.scale, keys_t.float())
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def hidden(self, query_positions: torch.Tensor, key_positions: torch.Tensor) -> torch.Tensor:
        """Bool [T, S]: True where query t may NOT see key i (future keys, or keys beyond the sliding window)."""
        distance = query_positions[:, None] - key_positions[None, :]
        hidden = distance < 0
        if self.sliding_window:
            hidden |= distance >= self.sliding_window
        return hidden

    def to_json(self) -> dict:
        return {"scale": self.scale, "sliding_window": self.sliding_window, "softcap": self.softcap}


@dataclass(frozen=True)
class Rotary:
    """RoPE as the model applies it (rotate-half convention): x_rot = x * cos + rotate_half(x) * sin, with
    cos/sin [D] = attention_scaling * cos/sin(position * inv_freq) repeated over both halves.

    inv_freq: D/2 inverse frequencies (after any RoPE scaling). attention_scaling: the model's cos/sin factor.
    """

    inv_freq: tuple[float, ...]
    attention_scaling: float = 1.0

    @classmethod
    def default(cls, head_dim: int, theta: float) -> Rotary:
        """Plain RoPE with base ``theta`` (no scaling), computed in float32 as transformers does."""
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        return cls(tuple(float(f) for f in inv_freq))

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [..., D] float32 for integer positions [...], on their device."""
        inv_freq = torch.tensor(self.inv_freq, dtype=torch.float64, device=positions.device)
        angles = positions.double()[..., None] * inv_freq
        angles = torch.cat([angles, angles], -1)
        return (angles.cos() * self.attention_scaling).float(), (angles.sin() * self.attention_scaling).float()

    def unrotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Undo RoPE: post-RoPE x [..., T, D] at positions [..., T] -> pre-RoPE float32 [..., T, D]."""
        cos, sin = self.cos_sin(positions)
        scale2 = self.attention_scaling**2  # cos^2 + sin^2 = attention_scaling^2
        x = x.float()
        return (x * cos - _rotate_half(x) * sin) / scale2

    def mean_rotation(self, positions: torch.Tensor) -> torch.Tensor:
        """The RoPE rotation matrix averaged over ``positions`` [..., P]: R [..., D, D] with x_rot = R @ x on average
        (one matrix per leading index), on the positions' device."""
        cos, sin = self.cos_sin(positions)  # [..., P, D]
        cos, sin = cos.mean(-2), sin.mean(-2)  # [..., D]
        half = cos.shape[-1] // 2
        eye = torch.eye(half, device=positions.device)
        swap = torch.zeros(
            2 * half, 2 * half, device=positions.device
        )  # rotate_half as a matrix: [x1, x2] -> [-x2, x1]
        swap[:half, half:] = -eye
        swap[half:, :half] = eye
        return torch.diag_embed(cos) + sin[..., :, None] * swap

    def to_json(self) -> dict:
        return {"inv_freq": list(self.inv_freq), "attention_scaling": self.attention_scaling}


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], -1)


def spec_from_json(data: dict, where: str) -> AttentionSpec:
    """An AttentionSpec from its JSON form; ValueError naming ``where`` when a field is missing or invalid."""
    try:
        spec = AttentionSpec(
            scale=float(data["scale"]), sliding_window=int(data["sliding_window"]), softcap=float(data["softcap"])
        )
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{where}: expected {{'scale', 'sliding_window', 'softcap'}} numbers ({err})") from None
    if not (math.isfinite(spec.scale) and spec.scale > 0 and spec.sliding_window >= 0 and spec.softcap >= 0):
        raise ValueError(f"{where}: expected scale > 0, sliding_window >= 0, softcap >= 0, found {data}")
    return spec


def rotary_from_json(data: dict | None, where: str) -> Rotary | None:
    """A Rotary from its JSON form (None stays None); ValueError naming ``where`` when malformed."""
    if data is None:
        return None
    try:
        rotary = Rotary(tuple(float(f) for f in data["inv_freq"]), float(data["attention_scaling"]))
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{where}: expected {{'inv_freq': [...], 'attention_scaling'}} ({err})") from None
    if not rotary.inv_freq or not all(math.isfinite(f) for f in (*rotary.inv_freq, rotary.attention_scaling)):
        raise ValueError(f"{where}: expected finite inverse frequencies and attention_scaling")
    return rotary
