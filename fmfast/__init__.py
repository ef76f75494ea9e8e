"""fmfast: a fast, faithful FmFormer (video + arc current anomaly detection for fused magnesium furnaces)."""
from fmfast.config import ModelConfig
from fmfast.models import CurrentViT, FmFormer, VideoViT, build_model
from fmfast.swap import swap_modules

__version__ = "0.1.0"
__all__ = ["CurrentViT", "FmFormer", "ModelConfig", "VideoViT", "build_model", "swap_modules"]
