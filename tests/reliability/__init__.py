"""Reliability and security under faults, load and bad input (issue #7)."""
