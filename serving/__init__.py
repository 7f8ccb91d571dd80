"""streamrec serving component (see docs/ and DESIGN)."""
