"""Replaying recorded traffic through another router (docs/replay.md)."""
