"""Azure Functions entry point (Python v2 programming model): build the app, register the handlers. Nothing else.

The handlers live in `functions/` (one module per job) and the logic in `tollwatch/`. Neither this module
nor anything it imports may import prefect — see tests/functions/test_fn_app.py.
"""

import azure.functions as func

from functions import backfill, eventgrid, openapi, watch

app = func.FunctionApp(http_auth_level=func.AuthLevel.FUNCTION)
app.register_functions(watch.bp)
app.register_functions(eventgrid.bp)
app.register_functions(backfill.bp)
app.register_functions(openapi.bp)
