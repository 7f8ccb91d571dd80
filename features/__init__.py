"""streamrec features: schema, ops, workflow and training sequences (``docs/features.md``).

The public API in one place:

- :class:`Schema`, :class:`Feature`, :class:`Kind`, :class:`Tag`,
  :func:`default_schema`: which features exist (``docs/features-schema.md``);
- :class:`Workflow`: fitted ops, ``transform(SessionBatch) -> FeatureBatch``,
  ``save`` / ``load`` (the ops themselves: ``features.ops``, ``docs/features-ops.md``);
- :class:`SessionBatch` (events in) and :class:`FeatureBatch` (tensors out);
- :func:`write_sequences` / :func:`read_sequences`: the batch path for training.
"""

from features.batch import FeatureBatch, SessionBatch
from features.schema import Feature, Kind, Schema, SchemaError, Tag, default_schema
from features.sequences import read_sequences, sequences_metadata, write_sequences
from features.workflow import Workflow

__all__ = [
    "Feature",
    "FeatureBatch",
    "Kind",
    "Schema",
    "SchemaError",
    "SessionBatch",
    "Tag",
    "Workflow",
    "default_schema",
    "read_sequences",
    "sequences_metadata",
    "write_sequences",
]
