"""`FrozenBatchNorm2d`: batch norm with fixed statistics and affine parameters (as torchvision's)."""
import torch


class FrozenBatchNorm2d(torch.nn.Module):
  """y = (x - running_mean) / sqrt(running_var + eps) * weight + bias, all buffers; [N, C, H, W]."""

  def __init__(self, num_features: int, eps: float = 1e-5):
    super().__init__()
    self.eps = eps
    self.register_buffer('weight', torch.ones(num_features))
    self.register_buffer('bias', torch.zeros(num_features))
    self.register_buffer('running_mean', torch.zeros(num_features))
    self.register_buffer('running_var', torch.ones(num_features))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    scale = self.weight * (self.running_var + self.eps).rsqrt()
    shift = self.bias - self.running_mean * scale
    return x * scale[None, :, None, None] + shift[None, :, None, None]
