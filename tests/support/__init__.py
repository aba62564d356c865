"""Test-only helpers shared by the layers (plain modules, never test modules or conftests): in-memory fakes of the
core's ports (fakes.py), readers of real services, stand-ins for remote endpoints, sample payloads and fixture files.
Never imported by production code."""
