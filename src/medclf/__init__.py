"""medclf: a reproducible pipeline for medical image classification.

Not for clinical use: models produced by this software are research artefacts
and must not be used for diagnosis without regulatory clearance.
"""

__version__ = "0.1.0"
STAGES = ("ingest", "validate", "augment", "train", "evaluate", "register")
