"""Floor 1, infrastructure every stage stands on: crash-safe file writes and disk-full errors (`io`), every file
a stage reads or writes (`catalog`), the project lock (`lock`) and the MLflow connection (`tracking`).

Nothing here knows about images, models or metrics. See docs/CONTRIBUTING.md for the floors.
"""
