"""streamrec: the application shell (CLI, settings, the embedded local stack).

The components are the top-level packages ``ingest``, ``features``, ``model``,
``serving`` and ``retrain``; this package only glues them together.
"""

__version__ = "0.1.0"
