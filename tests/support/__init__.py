"""Test-only helpers: readers of real services and recorded implementations of interfaces (never in production code)."""
