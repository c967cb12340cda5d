"""The latent space of latent U-ViT: Stable Diffusion's KL-f8 autoencoder (diffusers' ``AutoencoderKL``)."""
import os
from typing import Optional

import torch
import torch.nn as nn

from ...utils.checkpoint import load_state_dict_file, load_weights

# Stable Diffusion's KL-f8 autoencoder (ch 128, ch_mult 1-2-4-4, 2 res blocks, 4 latent channels)
SD_KL_F8 = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                block_out_channels=(128, 256, 512, 512), down_block_types=('DownEncoderBlock2D', ) * 4,
                up_block_types=('UpDecoderBlock2D', ) * 4, sample_size=256)


class SDAutoencoder(nn.Module):
    """Frozen KL autoencoder: ``encode`` images in [-1, 1] to scaled latents, ``decode`` latents back.

    Latent = scale_factor x (mean + std x noise) of the encoder's Gaussian (a fresh sample per call, as U-ViT trains);
    decoding divides by the scale factor.

    Args:
        checkpoint: a local file with the weights, in diffusers' layout or the original LDM / U-ViT layout
            (``autoencoder_kl.pth``, converted with diffusers' own converter). Nothing is downloaded.
        scale_factor: 0.18215 (ImageNet, Stable Diffusion) or 0.23010 (U-ViT's MS-COCO models).
        config: ``AutoencoderKL`` arguments; default Stable Diffusion's KL-f8.
        random_init: allow ``checkpoint=None`` (an untrained autoencoder, for tests).
    """

    def __init__(self, checkpoint: Optional[str], scale_factor: float = 0.18215, config: Optional[dict] = None,
                 random_init: bool = False):
        super().__init__()
        try:
            from diffusers import AutoencoderKL
        except ImportError as error:  # pragma: no cover - diffusers is a dependency
            raise ImportError('latent U-ViT needs diffusers (pip install diffusers)') from error
        self.config = dict(SD_KL_F8, **(config or {}))
        self.model = AutoencoderKL(**self.config)
        self.scale_factor = scale_factor
        self.checkpoint = checkpoint
        if checkpoint is not None:
            self.load(checkpoint)
        elif not random_init:
            raise ValueError('the latent autoencoder needs a checkpoint (Stable Diffusion\'s KL-f8 weights, a local file); '
                             'random_init=True builds an untrained one for tests only')
        self.requires_grad_(False).eval()

    def load(self, checkpoint: str):
        if not os.path.isfile(checkpoint):
            raise FileNotFoundError(f'autoencoder checkpoint {checkpoint} does not exist; download Stable Diffusion\'s '
                                    'KL-f8 autoencoder (e.g. U-ViT\'s autoencoder_kl.pth) and give its local path')
        state = load_state_dict_file(checkpoint)
        if any(k.startswith('encoder.down.') for k in state):  # the original LDM layout
            from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
            state = convert_ldm_vae_checkpoint(state, dict(self.model.config))
        load_weights(self.model, state, source=checkpoint)

    def __deepcopy__(self, memo):
        return self  # frozen: copies of the model (EMA) share it

    def train(self, mode: bool = True):
        return super().train(False)  # always frozen

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode(images).latent_dist.sample() * self.scale_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.model.decode(latents / self.scale_factor).sample
