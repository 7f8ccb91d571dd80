"""streamrec retrain component (see docs/ and DESIGN)."""
