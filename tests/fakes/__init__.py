"""Test doubles that tests and benchmarks start: servers that stand in for real backends."""
