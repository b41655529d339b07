"""bnlab.nn: the PyTorch batch-norm toolkit.

Batch Renorm, Ghost BN, frozen BN, statistics recalibration, BN folding, norm replacement
and a SyncBatchNorm that works over torch.distributed on CPU (gloo) as well as GPU.

Guards on bnlab's BN modules (``BatchRenorm*``, ``GhostBatchNorm*``):

* ``skip_nonfinite=True`` (default): a training batch whose statistics are not finite does
  not update the running statistics (nor ``num_batches_tracked``); a ``RuntimeWarning``
  names the layer once. The output still carries the NaN, as torch's does.
* ``small_batch="error"`` (default): a training batch with one value per channel raises
  torch's message plus a hint (drop_last / eval / "skip"); ``small_batch="skip"``
  normalises it with the running statistics and does not update them.
"""

from bnlab.nn.accumulate import BNAccumulator, accumulate_bn
from bnlab.nn.fold import fold_bn
from bnlab.nn.frozen import FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d
from bnlab.nn.ghost import GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d
from bnlab.nn.noisy import NoisyBatchNorm1d, NoisyBatchNorm2d, NoisyBatchNorm3d, reseed_noise
from bnlab.nn.recalibrate import recalibrate_bn
from bnlab.nn.renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d
from bnlab.nn.replace import freeze_bn, name_bn_layers, replace_norm, unfreeze_bn
from bnlab.nn.rewrite import NormAct, RewriteReport, RewriteWarning
from bnlab.nn.sync import SyncBatchNorm, convert_sync_batchnorm

__all__ = ["SyncBatchNorm", "convert_sync_batchnorm"]
__all__ += ["BNAccumulator", "accumulate_bn"]
__all__ += [
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "GhostBatchNorm3d",
    "NoisyBatchNorm1d",
    "NoisyBatchNorm2d",
    "NoisyBatchNorm3d",
    "NormAct",
    "RewriteReport",
    "RewriteWarning",
    "fold_bn",
    "freeze_bn",
    "name_bn_layers",
    "recalibrate_bn",
    "replace_norm",
    "reseed_noise",
    "unfreeze_bn",
]
