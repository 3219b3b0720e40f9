"""Ingest throughput on the shared chest X-rays: prints images/s and CPU use (never a timed test).

.venv/bin/python bench/ingest_bench.py [--data ../shared/data/chest_xray] [--size 224] [--channels 1]
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.conftest import KERMANY_REGEX, write_params


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/chest_xray"))
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--channels", type=int, default=1)
    ap.add_argument("--workers", type=int, default=0)
    args = ap.parse_args()
    os.environ.setdefault("MEDCLF_PATIENT_SALT", "bench")
    from medclf.config import load_settings
    from medclf.stages import ingest

    with tempfile.TemporaryDirectory() as tmp:
        params = write_params(
            Path(tmp),
            {
                "ingest": {
                    "source": {"kind": "folder", "uri": args.data, "patient_id_regex": KERMANY_REGEX},
                    "image_size": args.size,
                    "channels": args.channels,
                    "workers": args.workers,
                }
            },
        )
        settings = load_settings(params)

        def cpu_seconds() -> float:
            return sum(
                r.ru_utime + r.ru_stime
                for r in (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN))
            )

        c0, t0 = cpu_seconds(), time.perf_counter()
        out = ingest.run(settings)
        wall = time.perf_counter() - t0
        cpu = cpu_seconds() - c0
    n = out["images"] + out["quarantined"]
    print(f"images={n} size={args.size} channels={args.channels} cores={os.cpu_count()}")
    print(f"wall={wall:.2f}s end_to_end={n / wall:.1f} img/s decode_stage={out['decode_images_per_second']} img/s")
    print(f"cpu_time={cpu:.2f}s cpu_utilisation={cpu / wall:.2f} cores busy (of {os.cpu_count()})")
    print(f"splits={out['splits']} patients={out['patients']} quarantined={out['quarantined']}")


if __name__ == "__main__":
    main()
