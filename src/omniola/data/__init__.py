"""Training data: Ola's record format (`ola_format`), the synthetic tiny omni world (`tiny_world`) and the frozen
encoders' feature cache (`feature_cache`).

See `docs/data.md` for how to point `OlaDataset` at Ola's released data and how to build the tiny world.
"""

from .feature_cache import EncoderFeatureCache, FeatureCacheMiss
from .ola_format import (
    ConvertedRecord,
    OlaCollator,
    OlaDataset,
    RecordError,
    convert_record,
    json_to_jsonl,
    read_records,
)

__all__ = [
    "ConvertedRecord",
    "EncoderFeatureCache",
    "FeatureCacheMiss",
    "OlaCollator",
    "OlaDataset",
    "RecordError",
    "convert_record",
    "json_to_jsonl",
    "read_records",
]
