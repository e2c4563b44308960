"""routelens dashboard (issue #5)."""
