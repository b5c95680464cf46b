"""Helpers of the test suite (not part of the uckpt package)."""
