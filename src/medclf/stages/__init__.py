"""One module per stage, each exposing `run(settings) -> dict` (a small, JSON-able result).

Each stage is declared once, in `medclf.pipeline`: the catalog entries it reads and writes and the
params.yaml keys it reads. The CLI is wired from those declarations.
"""
