"""streamrec serving: the live recommendation service (``docs/serving.md``).

``serving.app.create_app`` builds the FastAPI app; the parts are importable
alone: ``batcher`` (dynamic batching), ``scorer`` (batch scoring with one
model version), ``models`` (hot swap of versions), ``fallback`` (popularity),
``online`` (the served record), ``settings``.
"""
