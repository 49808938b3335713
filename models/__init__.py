"""Model architectures that simplenn-serve can rebuild from code (``SIMPLENN_MODEL_CLASS``)."""
