"""The PyTorch reference for r1c training: export an r1c DeepSeek-V3 model (config constants + weights) to a Hugging
Face `DeepseekV3ForCausalLM` (the inverse of `r1c.frontends.hf`) and train it with torch AdamW/SGD, clipping and the
same learning-rate schedule on the same batches. Needs torch and transformers (test extras)."""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np

from r1c.frontends.hf.config import config_from_hf
from r1c.ir.ops.optim import lr_at
from r1c.train.config import TrainConfig


class ExportError(ValueError):
    pass


def hf_config_dict(attrs: dict[str, Any]) -> dict[str, Any]:
    """A `DeepseekV3Config` (or, for V2-style routing, `DeepseekV2Config`) dict whose model `r1c.frontends.hf` maps
    back to exactly these config constants."""
    v3 = attrs.get("scoring") == "sigmoid" and attrs.get("group_score") == "top2sum" and attrs.get("use_score_bias")
    v2 = attrs.get("scoring") == "softmax" and attrs.get("group_score") == "max" and not attrs.get("use_score_bias")
    if not (v2 or v3):
        raise ExportError(
            "only DeepSeek-V3-style routing (sigmoid scores, top2sum groups, score bias) or V2-style routing "
            "(softmax scores, max groups, no bias) exports to HF"
        )
    cfg: dict[str, Any] = {
        "model_type": "deepseek_v3" if v3 else "deepseek_v2",
        "vocab_size": attrs["vocab_size"],
        "hidden_size": attrs["hidden_size"],
        "intermediate_size": attrs["intermediate_size"],
        "moe_intermediate_size": attrs["moe_intermediate_size"],
        "num_hidden_layers": attrs["num_layers"],
        "num_attention_heads": attrs["num_heads"],
        "num_key_value_heads": attrs["num_heads"],
        "n_shared_experts": attrs["n_shared_experts"],
        "n_routed_experts": attrs["n_routed_experts"],
        "num_experts_per_tok": attrs["experts_per_tok"],
        "first_k_dense_replace": attrs["first_k_dense"],
        "n_group": attrs["n_group"],
        "topk_group": attrs["topk_group"],
        "norm_topk_prob": attrs["norm_topk_prob"],
        "routed_scaling_factor": attrs["routed_scaling_factor"],
        "q_lora_rank": attrs["q_lora_rank"] or None,
        "kv_lora_rank": attrs["kv_lora_rank"],
        "qk_nope_head_dim": attrs["qk_nope_head_dim"],
        "qk_rope_head_dim": attrs["qk_rope_head_dim"],
        "v_head_dim": attrs["v_head_dim"],
        "rms_norm_eps": attrs["rms_eps"],
        "initializer_range": attrs["init_std"],
        "tie_word_embeddings": attrs["tie_embeddings"],
        "max_position_embeddings": attrs["rope_original_max_position"],
    }
    if v3:
        cfg["rope_interleave"] = attrs["rope_interleave"]
    else:
        cfg["topk_method"] = "greedy" if attrs["n_group"] == 1 else "group_limited_greedy"
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": attrs["rope_theta"]}
    if attrs["rope_scaling"] == "yarn":
        cfg["max_position_embeddings"] = int(attrs["rope_original_max_position"] * attrs["rope_factor"])
        rope.update(
            rope_type="yarn",
            factor=attrs["rope_factor"],
            original_max_position_embeddings=attrs["rope_original_max_position"],
            beta_fast=attrs["rope_beta_fast"],
            beta_slow=attrs["rope_beta_slow"],
            mscale=attrs["rope_mscale"],
            mscale_all_dim=attrs["rope_mscale_all_dim"],
        )
    cfg["rope_parameters"] = rope
    # The export is right only if the HF frontend reads it back as the same model.
    back = config_from_hf(cfg)
    differ = {k: (v, attrs.get(k)) for k, v in back.items() if attrs.get(k) != v}
    if differ:
        raise ExportError(f"config constants do not survive the HF round trip: {differ}")
    return cfg


def hf_state_dict(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """r1c weight names -> HF names: stacked expert gate/up projections fuse into `gate_up_proj [E, 2F, D]`."""
    out: dict[str, np.ndarray] = {}
    for name, w in weights.items():
        if name.endswith(".mlp.experts.up_proj"):
            continue
        if name.endswith(".mlp.experts.gate_proj"):
            prefix = name[: -len(".gate_proj")]
            out[f"{prefix}.gate_up_proj"] = np.concatenate([w, weights[f"{prefix}.up_proj"]], axis=1)
        else:
            out[name] = w
    return out


def hf_model(attrs: dict[str, Any], weights: dict[str, np.ndarray]):
    import torch
    import transformers

    cfg = {k: v for k, v in hf_config_dict(attrs).items() if k != "model_type"}
    model = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**cfg, attn_implementation="eager"))
    model = model.float()
    state = {k: torch.tensor(np.asarray(v, np.float32)) for k, v in hf_state_dict(weights).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ExportError(f"HF model does not match the weights: missing {missing}, unexpected {unexpected}")
    return model


def torch_train(model, batches: Iterable[tuple[np.ndarray, np.ndarray]], cfg: TrainConfig) -> list[float]:
    """Train `model` one step per batch as r1c's train step does: loss, backward, clip, schedule, update."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adamw":
        opt = torch.optim.AdamW(
            params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=cfg.weight_decay, foreach=False
        )
    else:
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, foreach=False)
    model.train()
    losses = []
    for step, (tokens, labels) in enumerate(batches, start=1):
        logits = model(torch.tensor(tokens, dtype=torch.long)).logits
        loss = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), torch.tensor(labels, dtype=torch.long).flatten(), ignore_index=-100
        )
        opt.zero_grad()
        loss.backward()
        if cfg.clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.clip)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg.lr, cfg.warmup, cfg.steps, cfg.min_lr, cfg.schedule)
        opt.step()
        losses.append(loss.item())
    return losses


def compare_with_torch(base, cfg: TrainConfig, tokens: np.ndarray) -> dict[str, Any]:
    """Train `base` (an r1c module) for cfg.steps steps with r1c's train step and with PyTorch from the same init on
    the same batches; returns both loss curves, their largest difference and the seconds per step of each."""
    import time

    from r1c.train.data import Batches
    from r1c.train.runtime import Trainer

    trainer = Trainer.create(base, cfg, tokens)
    model = hf_model(base.attrs, {name: trainer.state[name] for name in base.params})
    sampler = Batches(tokens, cfg.batch, cfg.seq, cfg.seed)  # the batches the trainer's own sampler will draw
    batches = [sampler.next() for _ in range(cfg.steps)]
    start = time.perf_counter()
    torch_losses = torch_train(model, batches, cfg)
    torch_s = (time.perf_counter() - start) / cfg.steps
    start = time.perf_counter()
    r1c_losses = [trainer.run_step().loss for _ in range(cfg.steps)]
    r1c_s = (time.perf_counter() - start) / cfg.steps
    diff = np.abs(np.array(r1c_losses) - np.array(torch_losses))
    return {
        "r1c_loss": r1c_losses,
        "torch_loss": torch_losses,
        "max_abs_diff": float(diff.max()),
        "r1c_seconds_per_step": r1c_s,
        "torch_seconds_per_step": torch_s,
    }
