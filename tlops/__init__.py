"""tlops: transfer learning of image classifiers, versioned, tracked and served."""

__version__ = "0.1.0"
