"""The VPT model core: config, modeling (projectors + injected-feature forward), session, loading."""
from transformers import AutoConfig, AutoModelForImageTextToText

from .config import VPTConfig
from .modeling import VPTForConditionalGeneration, VPTOutput

AutoConfig.register(VPTConfig.model_type, VPTConfig, exist_ok=True)
AutoModelForImageTextToText.register(VPTConfig, VPTForConditionalGeneration, exist_ok=True)

__all__ = ["VPTConfig", "VPTForConditionalGeneration", "VPTOutput"]
