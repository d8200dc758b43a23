"""Training data: Ola's record format (`ola_format`) and the synthetic tiny omni world (`tiny_world`).

See `docs/data.md` for how to point `OlaDataset` at Ola's released data and how to build the tiny world.
"""

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
    "OlaCollator",
    "OlaDataset",
    "RecordError",
    "convert_record",
    "json_to_jsonl",
    "read_records",
]
