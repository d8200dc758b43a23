"""omniola: an open implementation of the Ola omni-modal language model (arXiv 2502.04328)."""

import logging

# transformers imports torchao (the `quant` extra, for `--weights int8|int4`) whenever it is installed; torchao then
# warns once per CUDA-only extension it cannot load, and torch about torchao's Enum registrations: noise on every
# command, about code a CPU run does not use. Errors still show.
for _noisy in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_noisy).setLevel(logging.ERROR)

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
