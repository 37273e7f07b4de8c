"""The code that runs SAM's passes: one module per backend, plus `SAMModel`."""
