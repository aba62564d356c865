"""What every part of tollwatch agrees on, as data with no heavy imports (the Spark side imports it on a cluster)."""
