"""omniola: an open implementation of the Ola omni-modal language model (arXiv 2502.04328)."""

from .configuration_ola import OlaConfig, OlaVisionConfig, vision_preset
from .errors import (
    ComponentNotFoundError,
    ConfigError,
    ConversionError,
    InputError,
    MediaError,
    OmniolaError,
    OutputInUseError,
)
from .modeling_ola import OlaForConditionalGeneration, OlaModel
from .processing_ola import OlaProcessor, OlaProcessorSettings

__version__ = "0.1.0"

__all__ = [
    "ComponentNotFoundError",
    "ConfigError",
    "ConversionError",
    "InputError",
    "MediaError",
    "OlaConfig",
    "OlaForConditionalGeneration",
    "OlaModel",
    "OlaProcessor",
    "OlaProcessorSettings",
    "OlaVisionConfig",
    "OmniolaError",
    "OutputInUseError",
    "vision_preset",
]
