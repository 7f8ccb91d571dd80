"""streamrec model component (see docs/ and DESIGN)."""
