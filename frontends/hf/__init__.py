"""r1c.frontends.hf: Hugging Face DeepSeek-V2/V3 configs and safetensors checkpoints -> r1c module + weights."""

from r1c.frontends.hf.config import HFConfigError, config_from_hf
from r1c.frontends.hf.loader import hf_module, load_hf
from r1c.frontends.hf.source import model_source
from r1c.frontends.hf.weights import HFWeightError

__all__ = ["HFConfigError", "HFWeightError", "config_from_hf", "hf_module", "load_hf", "model_source"]
