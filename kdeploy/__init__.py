"""kdeploy: is this Keras model ready to deploy on that hardware, and what is the best artifact?

Importing this package imports no ML framework; TensorFlow, LiteRT and ONNX Runtime are
imported lazily by the modules that need them.
"""

__version__ = "0.1.0"
