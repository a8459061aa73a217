"""Map HF DeepSeek checkpoint tensors to r1c parameter names and check them against a module.

Names are 1:1 except routed experts, which r1c stacks as `mlp.experts.gate_proj/up_proj [E, F, D]` and
`down_proj [E, D, F]`. Checkpoints come in two layouts:
- transformers 5: fused `mlp.experts.gate_up_proj [E, 2F, D]` (gate rows first: the model does
  `linear(x, gate_up_proj[e]).chunk(2, dim=-1)`) and `mlp.experts.down_proj [E, D, F]`;
- DeepSeek's originals: `mlp.experts.{j}.{gate,up,down}_proj.weight` per expert, possibly FP8 with
  `weight_scale_inv` block scales, plus multi-token-prediction layers after the last layer (not part of the
  forward pass, skipped).
"""

from __future__ import annotations

import re

import numpy as np

from r1c.ir.core import Module


class HFWeightError(ValueError):
    pass


_PER_EXPERT = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_FUSED = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.gate_up_proj$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def dequantize_fp8(tensors: dict[str, np.ndarray], block: tuple[int, int]) -> dict[str, np.ndarray]:
    """Apply DeepSeek's per-block `weight_scale_inv` (one scale per block[0] x block[1] tile) to FP8 weights."""
    out = dict(tensors)
    for name in [n for n in tensors if n.endswith(".weight_scale_inv")]:
        weight_name = name[: -len("_scale_inv")]
        if weight_name not in out:
            raise HFWeightError(f"scale {name} has no weight {weight_name}")
        w, s = out[weight_name], out.pop(name)
        rows, cols = w.shape
        scale = np.repeat(np.repeat(s, block[0], axis=0)[:rows], block[1], axis=1)[:, :cols]
        out[weight_name] = (w.astype(np.float32) * scale).astype(np.float32)
    return out


def _stack_experts(per_expert: dict[str, dict[int, dict[str, np.ndarray]]]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for prefix, experts in per_expert.items():
        ids = sorted(experts)
        if ids != list(range(len(ids))):
            missing = sorted(set(range(max(ids) + 1)) - set(ids))
            raise HFWeightError(f"{prefix}: experts {missing} are missing from the checkpoint")
        for proj in ("gate_proj", "up_proj", "down_proj"):
            absent = [j for j in ids if proj not in experts[j]]
            if absent:
                raise HFWeightError(f"{prefix}: experts {absent} have no {proj}.weight")
            out[f"{prefix}.{proj}"] = np.stack([experts[j][proj] for j in ids])
    return out


def to_r1c_names(
    tensors: dict[str, np.ndarray], num_layers: int, num_mtp_layers: int, tie_embeddings: bool
) -> dict[str, np.ndarray]:
    """Rename/restack HF tensors to r1c parameter names (shapes are checked later, against the module)."""
    out: dict[str, np.ndarray] = {}
    per_expert: dict[str, dict[int, dict[str, np.ndarray]]] = {}
    for name, x in tensors.items():
        layer = _LAYER.match(name)
        if layer and num_layers <= int(layer.group(1)) < num_layers + num_mtp_layers:
            continue  # multi-token-prediction module: not used by the forward pass
        if name.endswith("rotary_emb.inv_freq") or (tie_embeddings and name == "lm_head.weight"):
            continue  # a recomputed buffer, or a copy of the tied embedding
        if m := _PER_EXPERT.match(name):
            per_expert.setdefault(m.group(1), {}).setdefault(int(m.group(2)), {})[m.group(3)] = x
        elif m := _FUSED.match(name):
            if x.ndim != 3 or x.shape[1] % 2:
                raise HFWeightError(f"{name}: expected [E, 2F, D], got shape {x.shape}")
            half = x.shape[1] // 2
            out[f"{m.group(1)}.gate_proj"], out[f"{m.group(1)}.up_proj"] = x[:, :half], x[:, half:]
        else:
            out[name] = x
    for name, x in _stack_experts(per_expert).items():
        if name in out:
            raise HFWeightError(f"{name} is given both per expert and stacked")
        out[name] = x
    return out


def check_weights(module: Module, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every module parameter gets a float32 tensor of its declared shape; anything else is named."""
    missing = sorted(set(module.params) - set(weights))
    unexpected = sorted(set(weights) - set(module.params))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(
                f"missing {len(missing)} parameter(s): {', '.join(missing[:10])}"
                + (" ..." if len(missing) > 10 else "")
            )
        if unexpected:
            parts.append(
                f"{len(unexpected)} unexpected tensor(s): {', '.join(unexpected[:10])}"
                + (" ..." if len(unexpected) > 10 else "")
            )
        raise HFWeightError("checkpoint does not match the model: " + "; ".join(parts))
    out: dict[str, np.ndarray] = {}
    for name, p in module.params.items():
        want = p.type.concrete({})
        x = weights[name]
        if tuple(x.shape) != want:
            raise HFWeightError(f"tensor {name} has shape {tuple(x.shape)}, the model declares {want}")
        out[name] = np.ascontiguousarray(x, dtype=np.float32)
    return out
