"""Checking the ops: seeded cases, the spec §6 comparators, and ``dsv4 run``."""
