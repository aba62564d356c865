"""Local development helpers: the Socrata mirror, synthetic data and managed processes."""
