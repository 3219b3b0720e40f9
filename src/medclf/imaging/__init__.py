"""Floor 2, images and the records that carry them: decoding (`pixels`, `images`, `dicom`), the patient split
(`splits`), pseudonymised patient ids (`privacy`), what changed between two ingests (`changes`), the modality
check (`modality`) and augmentation (`augmentation`).

Pure array and file code: no Keras model, no metric, no MLflow.
"""
