"""`torchvision.ops` stand-in: only `misc.FrozenBatchNorm2d`."""
from torchvision.ops import misc  # noqa: F401
from torchvision.ops.misc import FrozenBatchNorm2d  # noqa: F401
