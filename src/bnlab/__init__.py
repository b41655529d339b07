"""bnlab: batch normalization, from the math to the cluster.

- ``bnlab.core``: batch norm from scratch in NumPy, exactly PyTorch's semantics (NumPy only).
- ``bnlab.nn``: the PyTorch toolkit (Batch Renorm, Ghost BN, frozen BN, recalibration,
  folding, SyncBatchNorm).
- ``bnlab.data`` / ``bnlab.models`` / ``bnlab.train``: the seed networks on MNIST.
- ``bnlab.experiments``: the claims lab.

Importing ``bnlab`` itself imports nothing heavy; each subpackage loads on demand.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
