"""`medclf <stage>`: the same `run(settings)` that DVC and Prefect call.

Nothing heavy is imported at module level, so `medclf --help` answers at once.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medclf import STAGES, __version__

if TYPE_CHECKING:
    from medclf.config import Settings


def _settings(args: argparse.Namespace) -> Settings:
    from medclf.config import load_settings

    return load_settings(args.params)


def _run_stage(args: argparse.Namespace) -> dict[str, Any]:
    module = importlib.import_module(f"medclf.stages.{args.command}")
    result: dict[str, Any] = module.run(_settings(args))
    return result


def _promote(args: argparse.Namespace) -> dict[str, Any]:
    from medclf.registry import promote

    return promote(_settings(args), version=args.version, alias=args.alias, by=args.by)


def _rollback(args: argparse.Namespace) -> dict[str, Any]:
    from medclf.registry import rollback

    return rollback(_settings(args), alias=args.alias, by=args.by)


def _predict(args: argparse.Namespace) -> dict[str, Any]:
    from medclf.predict import predict_paths

    return predict_paths(args.paths, model_uri=args.model, out=args.out, settings=_settings(args))


def _demo_data(args: argparse.Namespace) -> dict[str, Any]:
    from medclf.sources.demo import write_demo_folder

    return write_demo_folder(_settings(args).ingest.source.synthetic, Path(args.out))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="medclf", description="Medical image classification pipeline. "
                                "Not for clinical use without regulatory clearance.")
    p.add_argument("--version", action="version", version=f"medclf {__version__}")
    p.add_argument("--params", default="params.yaml", help="parameters file (default: params.yaml)")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)
    for stage in STAGES:
        sub.add_parser(stage, help=f"run the {stage} stage").set_defaults(func=_run_stage)
    pr = sub.add_parser("promote", help="move an alias (default: champion) to a model version")
    pr.add_argument("--version", required=True, type=int)
    pr.add_argument("--alias", default="champion")
    pr.add_argument("--by", default=None, help="who promotes (recorded as a version tag; default: $USER)")
    pr.set_defaults(func=_promote)
    rb = sub.add_parser("rollback", help="move an alias back to its previous version")
    rb.add_argument("--alias", default="champion")
    rb.add_argument("--by", default=None, help="who rolls back (recorded as a version tag; default: $USER)")
    rb.set_defaults(func=_rollback)
    pd_ = sub.add_parser("predict", help="classify images, folders or DICOM files")
    pd_.add_argument("paths", nargs="+")
    pd_.add_argument("--model", default=None, help="model URI (default: models:/<register.model_name>@champion)")
    pd_.add_argument("--out", default="predictions.csv")
    pd_.set_defaults(func=_predict)
    dd = sub.add_parser("demo-data", help="write the SYNTHETIC demo phantoms as a PNG class folder")
    dd.add_argument("out")
    dd.set_defaults(func=_demo_data)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from medclf.config import ConfigError

    try:
        result = args.func(args)
    except ConfigError as err:
        print(f"medclf: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # every stage error reaches the user as one clear line + cause
        if args.verbose:
            raise
        print(f"medclf {args.command}: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
