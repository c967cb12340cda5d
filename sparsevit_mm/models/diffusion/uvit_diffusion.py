"""U-ViT diffusion models for mmengine: noise-prediction training, classifier-free guidance, DPM-Solver sampling."""
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
from mmengine.model import BaseModel

from ..backbones.uvit import UViT
from .autoencoder import SDAutoencoder
from .dpm_solver import dpm_solver_sample
from .schedules import build_schedule


class UViTDiffusion(BaseModel):
    """A U-ViT diffusion model trained and sampled with mmengine's runner, hooks and launchers.

    Training loss: mean squared error between the true and predicted noise of x_t = alpha_t x_0 + sigma_t noise,
    with t from the schedule (``'continuous'``: VP-SDE, the network sees 999 t; ``'discrete'``: Stable Diffusion's
    1000 steps, the network sees n). With ``p_uncond > 0`` the label of each sample is replaced by the null label
    with that probability (classifier-free guidance training).

    Args:
        network: the :class:`UViT` config (class-conditional when its ``num_classes`` > 0).
        schedule: ``'continuous'`` or ``'discrete'``.
        p_uncond: probability of dropping the label (0.1 / 0.15 for the ImageNet models).
        null_label: the null label (default: the last one, ``num_classes - 1``, e.g. 1000 of 1001).
        autoencoder: ``dict(checkpoint=..., scale_factor=0.18215)`` for latent diffusion (see :class:`SDAutoencoder`).
            It is frozen and not saved with the model.
        sampler: defaults for :meth:`sample`: ``steps`` (50), ``order`` (3), ``guidance`` (0: none),
            ``data_prediction`` (default: DPM-Solver++ for the discrete schedule, DPM-Solver otherwise), ``spacing``.
        data_preprocessor: default maps uint8 images to [-1, 1] (RGB).
    """

    def __init__(self, network: dict, schedule: str = 'continuous', p_uncond: float = 0.0,
                 null_label: Optional[int] = None, autoencoder: Optional[dict] = None,
                 sampler: Optional[dict] = None, data_preprocessor: Optional[dict] = None, init_cfg=None):
        if data_preprocessor is None:
            data_preprocessor = dict(type='ImgDataPreprocessor', mean=[127.5] * 3, std=[127.5] * 3, bgr_to_rgb=True)
        super().__init__(data_preprocessor=data_preprocessor, init_cfg=init_cfg)
        if not isinstance(network, nn.Module):
            network = dict(network)
            kind = network.pop('type', 'UViT')
            if kind != 'UViT':
                raise ValueError(f"UViTDiffusion's network must be a UViT, got type {kind!r}")
            network = UViT(**network)
        self.network = network
        self.schedule = build_schedule(schedule)
        self.schedule_kind = schedule
        num_classes = self.network.num_classes
        if not 0.0 <= p_uncond < 1.0:
            raise ValueError(f'p_uncond must lie in [0, 1), got {p_uncond}')
        if p_uncond > 0 and num_classes <= 0:
            raise ValueError('p_uncond > 0 (classifier-free guidance training) needs a class-conditional network')
        self.p_uncond = p_uncond
        self.null_label = null_label if null_label is not None else (num_classes - 1 if num_classes > 0 else None)
        # Not a submodule: frozen, its weights stay out of our checkpoints, optimizer and DDP (moved on first use).
        object.__setattr__(self, 'autoencoder', SDAutoencoder(**autoencoder) if autoencoder is not None else None)
        self.sampler = {'steps': 50, 'order': 3, 'guidance': 0.0, 'data_prediction': schedule == 'discrete',
                        'spacing': 'logSNR', **(sampler or {})}

    # ---------------------------------------------------------------------------------------------- helpers
    def _labels(self, data_samples) -> Optional[torch.Tensor]:
        if self.network.num_classes <= 0:
            return None
        if not data_samples or 'gt_label' not in data_samples[0]:
            raise ValueError('this U-ViT is class-conditional: the data must carry labels (gt_label)')
        return torch.cat([sample.gt_label for sample in data_samples]).long()

    def drop_labels(self, labels: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """Replace each label by the null label with probability ``p_uncond`` (classifier-free guidance)."""
        if labels is None or self.p_uncond <= 0:
            return labels
        drop = torch.rand(labels.shape, device=labels.device) < self.p_uncond
        return torch.where(drop, torch.full_like(labels, self.null_label), labels)

    def _to_model_space(self, images: torch.Tensor) -> torch.Tensor:
        if self.autoencoder is None:
            return images
        self.autoencoder.to(images.device)
        return self.autoencoder.encode(images)

    def _broadcast(self, values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return values.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))

    # ---------------------------------------------------------------------------------------------- training
    def loss(self, inputs: torch.Tensor, data_samples=None) -> dict:
        x0 = self._to_model_space(inputs)
        labels = self.drop_labels(self._labels(data_samples))
        t = self.schedule.sample_train_time(x0.shape[0], x0.device)
        noise = torch.randn_like(x0)
        alpha = self._broadcast(torch.exp(self.schedule.log_alpha(t)), x0)
        sigma = self._broadcast(self.schedule.sigma(t), x0)
        predicted = self.network(alpha * x0 + sigma * noise, self.schedule.network_time(t), labels)
        return {'loss': (predicted.float() - noise.float()).pow(2).flatten(1).mean(1).mean()}

    def forward(self, inputs: torch.Tensor, data_samples=None, mode: str = 'loss'):
        if mode == 'loss':
            return self.loss(inputs, data_samples)
        if mode == 'predict':  # samples with the data's labels (a validation loop can score them)
            labels = self._labels(data_samples)
            images = self.sample(inputs.shape[0], labels=labels)
            for sample, image in zip(data_samples, images):
                sample.set_field(image, 'pred_image')
            return data_samples
        if mode == 'tensor':
            x0 = self._to_model_space(inputs)
            t = self.schedule.sample_train_time(x0.shape[0], x0.device)
            return self.network(x0, self.schedule.network_time(t), self._labels(data_samples))
        raise RuntimeError(f'Invalid mode "{mode}".')

    # ---------------------------------------------------------------------------------------------- sampling
    def noise_fn(self, labels: Optional[torch.Tensor], guidance: float):
        """(x_t, t) -> guided noise prediction eps_c + s (eps_c - eps_u)."""
        network, schedule = self.network, self.schedule

        def predict(x, t):
            time = schedule.network_time(t)
            if guidance == 0 or labels is None:
                return network(x, time, labels)
            null = torch.full_like(labels, self.null_label)
            both = network(torch.cat([x, x]), torch.cat([time, time]), torch.cat([labels, null]))
            conditional, unconditional = both.chunk(2)
            return conditional + guidance * (conditional - unconditional)
        return predict

    @torch.no_grad()
    def sample(self, num: int, labels: Union[None, int, Sequence[int], torch.Tensor] = None,
               guidance: Optional[float] = None, steps: Optional[int] = None, order: Optional[int] = None,
               generator: Optional[torch.Generator] = None, progress: bool = False) -> torch.Tensor:
        """``num`` images in [0, 1], (num, 3, H, W). Labels: None (random for conditional models), one, or num."""
        options = dict(self.sampler)
        guidance = options['guidance'] if guidance is None else guidance
        device = next(self.network.parameters()).device
        network = self.network
        if network.num_classes > 0:
            real_classes = network.num_classes - (1 if self.null_label == network.num_classes - 1 else 0)
            if labels is None:
                labels = torch.randint(0, real_classes, (num, ), generator=generator)
            labels = torch.as_tensor(labels).long().flatten()
            labels = labels.expand(num) if labels.numel() == 1 else labels
            if labels.numel() != num or labels.min() < 0 or labels.max() >= real_classes:
                raise ValueError(f'labels must be one value or {num} values in [0, {real_classes}); got '
                                 f'{labels.tolist()[:10]}')
            labels = labels.to(device)
        elif labels is not None:
            raise ValueError('this U-ViT is unconditional; it takes no labels')
        if guidance and (network.num_classes <= 0 or self.null_label is None):
            raise ValueError('classifier-free guidance needs a class-conditional model trained with a null label')
        shape = (num, network.in_channels, network.img_size, network.img_size)
        noise = torch.randn(shape, generator=generator).to(device)
        latents = dpm_solver_sample(self.noise_fn(labels, float(guidance)), noise, self.schedule,
                                    steps or options['steps'], order or options['order'],
                                    options['data_prediction'], options['spacing'], progress)
        if self.autoencoder is not None:
            self.autoencoder.to(device)
            latents = self.autoencoder.decode(latents)
        return ((latents.float() + 1) / 2).clamp(0, 1)
