"""The VPT model core: config, modeling (projectors + injected-feature forward), session, loading."""
from transformers import AutoConfig, AutoModelForImageTextToText

from .config import VPTConfig, VPTQwen2_5Config
from .modeling import VPT_MODELS, VPTForConditionalGeneration, VPTOutput, VPTQwen2_5ForConditionalGeneration

for _config, _model in VPT_MODELS.items():
    AutoConfig.register(_config.model_type, _config, exist_ok=True)
    AutoModelForImageTextToText.register(_config, _model, exist_ok=True)

__all__ = ["VPTConfig", "VPTForConditionalGeneration", "VPTOutput", "VPTQwen2_5Config",
           "VPTQwen2_5ForConditionalGeneration"]
