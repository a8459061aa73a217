"""Recognizing what an attention op's K/V are cached as: the MLA latent pattern of r1c/stdlib/deepseek.r1.

MLA caches the normalized latent [B, S, C] and the shared rotary key [B, S, 1, dr]; attention then reads

    kv  = linear(latent, W)                    W: [H*(dn+dv), C]   (kv_b_proj)
    kv4 = reshape(kv) [B, S, H, dn+dv]
    k   = transpose(concat(slice(kv4, 0:dn), broadcast_to(k_rot [B,S,1,dr]) [B,S,H,dr]), perm=[0,2,1,3])
    v   = transpose(slice(kv4, dn:dn+dv), perm=[0,2,1,3])
"""

from __future__ import annotations

from dataclasses import dataclass

from r1c.ir.core import Op, Value

HEADS_FIRST = (0, 2, 1, 3)


@dataclass(frozen=True)
class MLACache:
    latent: Value  # [B, S, C]
    k_rot: Value  # [B, S, 1, dr]
    weight: Value  # kv_b_proj weight [H*(dn+dv), C]
    qk_nope_head_dim: int
    v_head_dim: int


def _producer(v: Value, producers: dict[Value, Op], name: str) -> Op | None:
    op = producers.get(v)
    return op if op is not None and op.name == name else None


def _last_axis_slice(v: Value, producers: dict[Value, Op]) -> tuple[Value, int, int] | None:
    """(source, start, stop) when `v` is a unit-step slice of the last axis."""
    op = _producer(v, producers, "slice")
    if op is None or op.attrs["step"] != 1 or op.attrs["axis"] % op.operands[0].type.rank != v.type.rank - 1:
        return None
    return op.operands[0], op.attrs["start"], op.attrs["stop"]


def _heads_first(v: Value, producers: dict[Value, Op]) -> Value | None:
    """x when v = transpose(x, perm=[0,2,1,3]) ([B,S,H,D] -> [B,H,S,D])."""
    op = _producer(v, producers, "transpose")
    return op.operands[0] if op is not None and tuple(op.attrs["perm"]) == HEADS_FIRST else None


def match_mla(k: Value, v: Value, producers: dict[Value, Op]) -> MLACache | None:
    """The MLA cache behind attention(q, k, v), or None when K/V are not built from a latent that way."""
    k_bshd, v_bshd = _heads_first(k, producers), _heads_first(v, producers)
    cat = _producer(k_bshd, producers, "concat") if k_bshd is not None else None
    if v_bshd is None or cat is None or len(cat.operands) != 2 or cat.attrs["axis"] % 4 != 3:
        return None
    k_nope, k_rot_heads = cat.operands
    nope, vals = _last_axis_slice(k_nope, producers), _last_axis_slice(v_bshd, producers)
    bcast = _producer(k_rot_heads, producers, "broadcast_to")
    if nope is None or vals is None or bcast is None or nope[0] != vals[0]:
        return None
    kv4, (_, n0, dn), (_, v0, v1) = nope[0], nope, vals
    k_rot = bcast.operands[0]
    if n0 != 0 or v0 != dn or kv4.type.shape[3] != v1 or k_rot.type.rank != 4 or k_rot.type.shape[2] != 1:
        return None
    reshape = _producer(kv4, producers, "reshape")
    if reshape is None or reshape.operands[0].type.shape[:2] != kv4.type.shape[:2]:  # [B,S,H*(dn+dv)] split
        return None
    proj = _producer(reshape.operands[0], producers, "linear")
    if proj is None or proj.operands[0].type.rank != 3:
        return None
    latent, weight = proj.operands
    return MLACache(latent, k_rot, weight, dn, v1 - v0)
