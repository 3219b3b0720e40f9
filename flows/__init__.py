"""Prefect flows: `retrain` (the whole pipeline through DVC) and `train_remote` (the GPU pool's half).

Without PREFECT_API_URL, Prefect starts a temporary local API server per run. Its default
20 s start-up limit is too short on a busy 2-core machine (measured: it timed out), so it is
raised here, before Prefect reads its settings; an explicit environment value still wins.
"""

import os

os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
# The pipeline runs offline; the local server's telemetry would only log a DNS error.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
