"""Run by the warm server's children in tests/integration/test_warm.py instead of Prefect's engine: shows what a child
sees (argv, environment, working directory, stdio) and how it ends (exit code, signals)."""

import os
import sys
import time

if __name__ == "__main__":
    print(f"argv={sys.argv[1:]} cwd={os.getcwd()} probe={os.environ.get('WARM_PROBE')}", flush=True)
    print("to-stderr", file=sys.stderr, flush=True)
    if os.environ.get("WARM_PROBE_SETTINGS"):  # what Prefect's settings say in this child
        from prefect.settings import get_current_settings

        print(f"api={get_current_settings().api.url}", flush=True)
    if sys.argv[1:] == ["sleep"]:
        time.sleep(60)
    sys.exit(int(os.environ.get("WARM_PROBE_EXIT", "0")))
