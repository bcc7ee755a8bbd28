"""ps3: high-resolution vision encoding with PS3 and S2."""
__version__ = "0.1.0"

from .config import PS3Config, PS3TextConfig, PS3VisionConfig  # noqa: E402

__all__ = ["__version__", "PS3Config", "PS3TextConfig", "PS3VisionConfig"]

from .vision import PS3VisionModel, PS3VisionOutput  # noqa: E402

__all__ += ["PS3VisionModel", "PS3VisionOutput"]
