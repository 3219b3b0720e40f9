"""Floor 3, judging a model from its scores: metrics with bootstrap CIs (`metrics`), temperature scaling
(`calibration`), the release gates (`gates`), the champion comparison (`comparison`) and scoring (`champion`),
subgroup tables (`subgroups`), the plots (`plots`), K-class and ordinal metrics and decision rules (`kclass`), and
the evaluation report: predictions in, a typed report out (`report`).

Arrays in, numbers and figures out: nothing here loads a model or talks to MLflow.
"""
