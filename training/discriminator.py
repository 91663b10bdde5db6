"""A PatchGAN discriminator (pix2pix, Isola et al. 2017) on images in [-1, 1], and the hinge losses.

It needs no pretrained weights, so it works offline. The TSD-SR release's projected discriminator on DINO features
would need those weights; plug such a model in with `training.distill.train(config, discriminator_factory=...)`.
"""

import torch
import torch.nn.functional as F
from torch import nn

from training.config import TrainConfig


class PatchDiscriminator(nn.Module):
    """Strided convs with spectral norm -> one real/fake logit per overlapping patch, shape (B, 1, h, w)."""

    def __init__(self, in_channels: int = 3, channels: int = 64, num_layers: int = 3):
        super().__init__()
        layers, width = [], in_channels
        for index in range(num_layers):
            out = channels * min(2**index, 8)
            layers += [nn.utils.spectral_norm(nn.Conv2d(width, out, 4, stride=2, padding=1)), nn.LeakyReLU(0.2)]
            width = out
        layers += [nn.utils.spectral_norm(nn.Conv2d(width, width, 3, padding=1)), nn.LeakyReLU(0.2),
                   nn.Conv2d(width, 1, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)


def hinge_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return F.relu(1 - real_logits.float()).mean() + F.relu(1 + fake_logits.float()).mean()


def default_discriminator(config: TrainConfig) -> nn.Module:
    """The GAN stages' discriminator unless `train` is given another `discriminator_factory`."""
    return PatchDiscriminator(channels=config.disc_channels, num_layers=config.disc_layers)
