"""bnlab.nn: the PyTorch batch-norm toolkit.

Batch Renorm, Ghost BN, frozen BN, statistics recalibration, BN folding, norm replacement
and a SyncBatchNorm that works over torch.distributed on CPU (gloo) as well as GPU.
"""
