"""The Azure Databricks workspace the respx-mocked tests talk to: placeholder names, nothing real.

Shared by tests/integration/test_databricks.py (which mocks the Jobs API route by route) and the downstream fault
tests (`tests.support.databricks_workspace.FakeWorkspace`, a stateful workspace on the same host), and by the
`credentials` / `databricks_blocks` fixtures in tests/conftest.py.
"""

from __future__ import annotations

HOST = "adb-1234567890123456.7.azuredatabricks.net"
API = f"https://{HOST}/api/2.1/jobs"
TENANT = "00000000-0000-0000-0000-000000000000"
TOKEN_URL = f"https://login.microsoftonline.com/{TENANT}/oauth2/v2.0/token"
RUN_PAGE = f"https://{HOST}/?o=1#job/0/run/42"
WHEEL = "/Workspace/Shared/tollwatch/artifacts/.internal/tollwatch-0.1.0-py3-none-any.whl"
