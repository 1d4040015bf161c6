"""A local stand-in for the Globus Compute web service and the clusters' endpoints.

The gateway's production backend (`first_core.compute.GlobusComputeBackend`) and
`compute_funcs/register.py` reach it through the real `globus-compute-sdk` `Client`, whose web
client is pointed here by `GLOBUS_SDK_SERVICE_URL_COMPUTE`, with a token from the Auth
stand-in's `client_credentials` grant. Each endpoint of the local registry runs its tasks in the
real `globus-compute-endpoint` engine (`endpoints.py`); the service's REST routes, task
documents and limits are in `service.py`; `worker.py` is what the workers run besides the task.

    python -m first_local.compute_standin --port P --config FILE
"""

from first_local.compute_standin.service import ApiLimit, ComputeService, Faults, create_app

__all__ = ["ApiLimit", "ComputeService", "Faults", "create_app"]
