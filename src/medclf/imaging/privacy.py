"""Patient-identifier pseudonymisation.

Patient ids are replaced by a keyed hash (HMAC-SHA256) before they reach the
manifest, logs, MLflow or git. The key ("salt") comes from the environment
(`MEDCLF_PATIENT_SALT`) or from a file that is never committed
(`MEDCLF_PATIENT_SALT_FILE`, default `secrets/patient_salt`). Without a key the
hash of a small id space could be reversed by brute force, so one is created on
first use and the user is told where it lives.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
from functools import lru_cache
from pathlib import Path

log = logging.getLogger(__name__)
SALT_ENV = "MEDCLF_PATIENT_SALT"
SALT_FILE_ENV = "MEDCLF_PATIENT_SALT_FILE"
DEFAULT_SALT_FILE = Path("secrets/patient_salt")


@lru_cache(maxsize=4)
def _salt(env_value: str | None, file_value: str | None) -> bytes:
    if env_value:
        return env_value.encode()
    path = Path(file_value) if file_value else DEFAULT_SALT_FILE
    if path.exists():
        return path.read_bytes().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_hex(32)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(key)
    try:
        os.link(tmp, path)  # atomic create-if-absent: a concurrent creator wins, we read its key
    except FileExistsError:
        return path.read_bytes().strip()
    finally:
        os.unlink(tmp)
    log.warning("created a new patient-id salt in %s (keep it secret, never commit it)", path)
    return key.encode()


def salt() -> bytes:
    return _salt(os.environ.get(SALT_ENV), os.environ.get(SALT_FILE_ENV))


def hash_patient(patient_id: str) -> str:
    """Stable pseudonym for a patient id: `p-` + 16 hex chars of HMAC-SHA256."""
    digest = hmac.new(salt(), patient_id.strip().encode(), hashlib.sha256).hexdigest()
    return "p-" + digest[:16]


def redact(text: str, patient_id: str | None) -> str:
    """Replace every occurrence of `patient_id` in `text` (e.g. a file name) by its pseudonym."""
    if not patient_id:
        return text
    return re.sub(re.escape(patient_id), hash_patient(patient_id), text)
