"""Why a candidate is off, by Keras layer: per-layer quantization error and the first diverging layer."""
