"""Floor 4, what leaves the pipeline: the MLflow registry's version protocol (`versions`), promotion, rollback and
the champion's reference (`registry`), the served pyfunc (`serving`), batch scoring (`predict`) and the model card
(`model_card`).
"""
