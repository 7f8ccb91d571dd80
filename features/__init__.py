"""streamrec features component (see docs/ and DESIGN)."""
