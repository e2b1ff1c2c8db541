"""gemma3_fast: Gemma 3 270M inference in PyTorch with fused C++/CUDA kernels."""

from .config import Gemma3Config
from .generation import Gemma3LM, GenerationStats, load
from .model import Gemma3Model
from .sampling import SamplingParams

__all__ = ["Gemma3Config", "Gemma3LM", "Gemma3Model", "GenerationStats", "SamplingParams", "load"]
__version__ = "0.1.0"
