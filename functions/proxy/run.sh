#!/bin/bash
# The inference proxy's Lambda handler (Lambda Web Adapter runs it: AWS_LAMBDA_EXEC_WRAPPER=/opt/bootstrap).
# It starts the ASGI app on $PORT; the adapter turns each invoke into an HTTP request to it and
# streams the answer back (AWS_LWA_INVOKE_MODE=response_stream).
#
# On Lambda this file sits at the root of the code (infra/deploy_tool.py stage puts it there,
# beside functions/proxy/); in the repository it is functions/proxy/run.sh. Either way it starts
# from the directory that holds functions/.
set -eu
here="$(cd "$(dirname "$0")" && pwd)"
if [ -f "$here/functions/proxy/app.py" ]; then cd "$here"; else cd "$here/../.."; fi
# The core layer's packages are in /opt/python; the managed runtime's own modules in $LAMBDA_RUNTIME_DIR.
export PATH="$PATH:${LAMBDA_TASK_ROOT:-.}/bin"
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}/opt/python${LAMBDA_RUNTIME_DIR:+:$LAMBDA_RUNTIME_DIR}"
exec python -m uvicorn functions.proxy.app:app --port "${PORT:-8080}"
