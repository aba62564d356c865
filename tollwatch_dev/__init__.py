"""tollwatch's development tools: the Socrata mirror, the local stack, the dev Functions host, the warm runner,
the demo, and their `tollwatch` commands (a CLI plugin). The product never imports this package
(tests/unit/test_import_rules.py)."""
