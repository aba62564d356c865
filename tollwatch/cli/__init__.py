"""The `tollwatch` command line (`main`), its shared plumbing (`common`), operations (`ops`) and automations."""
