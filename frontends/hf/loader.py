"""Load a Hugging Face DeepSeek-V2/V3 checkpoint directory as an r1c module plus float32 weights."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from r1c.frontends.hf.config import config_from_hf
from r1c.frontends.hf.safetensors_io import read_safetensors
from r1c.frontends.hf.source import model_source
from r1c.frontends.hf.weights import HFWeightError, check_weights, dequantize_fp8, to_r1c_names
from r1c.ir.core import Module


def _checkpoint_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({model_dir / f for f in weight_map.values()})
        absent = [str(f) for f in files if not f.exists()]
        if absent:
            raise HFWeightError(f"{index} names shard(s) that do not exist: {', '.join(absent)}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise HFWeightError(f"no *.safetensors files in {model_dir}")
    return files


def _module_name(model_dir: Path) -> str:
    name = re.sub(r"[^A-Za-z0-9_]", "_", model_dir.resolve().name) or "model"
    return name if name[0].isalpha() or name[0] == "_" else f"m_{name}"


def hf_module(hf_config: dict, name: str = "deepseek_model") -> Module:
    """The r1c module for a HF config dict (IR only; no weights are read or made)."""
    from r1c.frontends.dsl import compile_source

    constants = config_from_hf(hf_config)
    source = model_source(constants, name=name)
    return compile_source(source, f"<hf:{name}>.r1")


def load_hf(model_dir: str | Path) -> tuple[Module, dict[str, np.ndarray]]:
    """(module, weights): config.json -> stdlib model, *.safetensors (sharded or not, bf16/fp8/f32) -> float32."""
    model_dir = Path(model_dir)
    config_path = model_dir / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{config_path} does not exist")
    hf_config = json.loads(config_path.read_text())
    module = hf_module(hf_config, _module_name(model_dir))
    tensors: dict[str, np.ndarray] = {}
    for f in _checkpoint_files(model_dir):
        for key, value in read_safetensors(f).items():
            if key in tensors:
                raise HFWeightError(f"tensor {key} appears in more than one shard (again in {f.name})")
            tensors[key] = value
    if any(k.endswith(".weight_scale_inv") for k in tensors):
        block = (hf_config.get("quantization_config") or {}).get("weight_block_size", [128, 128])
        tensors = dequantize_fp8(tensors, (int(block[0]), int(block[1])))
    constants = module.attrs
    mtp = int(hf_config.get("num_nextn_predict_layers", hf_config.get("num_mtp_layers", 0)) or 0)
    named = to_r1c_names(tensors, int(constants["num_layers"]), mtp, bool(constants["tie_embeddings"]))
    return module, check_weights(module, named)
