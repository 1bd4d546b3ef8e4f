"""carclf: fine-grained car-model recognition, from class folders to a calibrated submission."""

__version__ = "0.1.0"
