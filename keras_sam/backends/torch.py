"""The PyTorch adapter: what keras_sam needs of torch and cannot write with `keras.ops`."""

# ------------------------------------------------------------------ autodiff primitives
# (used by the diagnostics; the SAM step may share them)


# ------------------------------------------------------------------------- the SAM step
