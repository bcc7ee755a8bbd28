"""ps3: high-resolution vision encoding with PS3 (select and encode the patches that matter, up
to 4K) and S2 (multi-scale features from any backbone)."""
__version__ = "0.1.0"

from .config import PS3Config, PS3TextConfig, PS3VisionConfig
from .model import PS3Model
from .processor import PS3ImageProcessor
from .encoder.selection import TokenCount, first_n_scales_for_sizes
from .text import PS3TextModel, PS3TextOutput
from .tokenizer import PS3Tokenizer
from .encoder.vision import LowResPass, PS3VisionModel, PS3VisionOutput
from . import s2, viz  # (ps3.s2.multiscale_forward, ps3.viz.overlay_selection)

__all__ = ["__version__", "PS3Config", "PS3TextConfig", "PS3VisionConfig", "PS3Model", "PS3ImageProcessor",
           "PS3TextModel", "PS3TextOutput", "PS3Tokenizer", "PS3VisionModel", "PS3VisionOutput", "LowResPass",
           "TokenCount", "first_n_scales_for_sizes", "s2", "viz"]
