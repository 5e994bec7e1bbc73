"""Shared fixtures come from tests/conftest.py."""
