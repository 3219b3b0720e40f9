"""One module per stage; each exposes `run(settings) -> dict` (a small, JSON-able result)."""
