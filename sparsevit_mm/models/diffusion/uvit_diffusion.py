"""U-ViT diffusion models for mmengine: noise-prediction training, classifier-free guidance, DPM-Solver sampling."""
import math
import numbers
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
from mmengine.model import BaseModel

from ...utils.checkpoint import CheckpointLayoutMixin

from ..backbones.uvit import UViT, official_uvit_to_ours
from .autoencoder import SDAutoencoder
from .dpm_solver import dpm_solver_sample
from .schedules import build_schedule


SPACINGS = ('logSNR', 'time_uniform')


def _is_integer(value) -> bool:
    # bool is an int subclass, and 2.0 would reach the solver's slicing as a float
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_steps(steps, name: str = 'steps') -> int:
    """A DPM-Solver step count: an integer >= 1."""
    if not _is_integer(steps) or steps < 1:
        raise ValueError(f'{name} must be an integer >= 1 (model evaluations of DPM-Solver), got {steps!r}')
    return int(steps)


def check_order(order, name: str = 'order') -> int:
    """A DPM-Solver order: 1, 2 or 3."""
    if not _is_integer(order) or order not in (1, 2, 3):
        raise ValueError(f'{name} must be 1, 2 or 3 (the DPM-Solver order), got {order!r}')
    return int(order)


def check_guidance(guidance, name: str = 'guidance') -> float:
    """A classifier-free guidance scale s: a finite number (0: no guidance)."""
    if isinstance(guidance, bool) or not isinstance(guidance, numbers.Real) or not math.isfinite(guidance):
        raise ValueError(f'{name} must be a finite number (the scale s, 0: no guidance), got {guidance!r}')
    return float(guidance)


class UViTDiffusion(CheckpointLayoutMixin, BaseModel):
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

    Official U-ViT checkpoints (plain state dicts of the network, ``nnet.pth`` / ``nnet_ema.pth``) load as they are
    (see :meth:`convert_checkpoint`).
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
        defaults = {'steps': 50, 'order': 3, 'guidance': 0.0, 'data_prediction': schedule == 'discrete',
                    'spacing': 'logSNR'}
        unknown = sorted(set(sampler or {}) - set(defaults))
        if unknown:
            raise ValueError(f'unknown sampler option(s) {unknown}; allowed: {sorted(defaults)}')
        self.sampler = {**defaults, **(sampler or {})}
        # Checked here, not at the first sample() deep inside the solver (a validation loop may be hours away).
        self.sampler['steps'] = check_steps(self.sampler['steps'], 'sampler steps')
        self.sampler['order'] = check_order(self.sampler['order'], 'sampler order')
        self.sampler['guidance'] = check_guidance(self.sampler['guidance'], 'sampler guidance')
        if self.sampler['spacing'] not in SPACINGS:
            raise ValueError(f"sampler spacing must be one of {SPACINGS}, got {self.sampler['spacing']!r}")
        if not isinstance(self.sampler['data_prediction'], bool):
            raise ValueError(f"sampler data_prediction must be True or False, got "
                             f"{self.sampler['data_prediction']!r}")
        if self.sampler['guidance'] and num_classes <= 0:
            raise ValueError(f"sampler guidance={self.sampler['guidance']} needs a class-conditional network "
                             '(classifier-free guidance); this one is unconditional')

    # ---------------------------------------------------------------------------------------------- helpers
    def convert_checkpoint(self, state_dict, checkpoint=None):
        """An official U-ViT network state dict (``in_blocks.*`` at the top) moves under ``network.``."""
        return official_uvit_to_ours(state_dict)

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
        """``num`` images in [0, 1], (num, 3, H, W). Labels: None (random for conditional models), one, or num.

        ``guidance``, ``steps`` and ``order`` default (None) to the ``sampler`` config's values.
        """
        options = dict(self.sampler)
        if not _is_integer(num) or num < 0:
            raise ValueError(f'num must be an integer >= 0 (images to sample), got {num!r}')
        guidance = options['guidance'] if guidance is None else check_guidance(guidance)
        # None means the default; 0 is an error, not the default (``steps or default`` took it silently)
        steps = options['steps'] if steps is None else check_steps(steps)
        order = options['order'] if order is None else check_order(order)
        device = next(self.network.parameters()).device
        network = self.network
        if network.num_classes > 0:
            real_classes = network.num_classes - (1 if self.null_label == network.num_classes - 1 else 0)
            if labels is None:
                labels = torch.randint(0, real_classes, (num, ), generator=generator)
            labels = torch.as_tensor(labels)
            if labels.numel() and (labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool):
                raise ValueError(f'labels must be integer class indices, got {labels.dtype} values '
                                 f'{labels.flatten().tolist()[:10]}')  # .long() would truncate 1.7 to 1 silently
            labels = labels.long().flatten()
            labels = labels.expand(num) if labels.numel() == 1 else labels
            # min() / max() of no labels (num=0) would fail: only non-empty labels are range-checked
            if labels.numel() != num or (num > 0 and (labels.min() < 0 or labels.max() >= real_classes)):
                raise ValueError(f'labels must be one value or {num} values in [0, {real_classes}); got '
                                 f'{labels.tolist()[:10]}')
            labels = labels.to(device)
        elif labels is not None:
            raise ValueError('this U-ViT is unconditional; it takes no labels')
        if guidance and (network.num_classes <= 0 or self.null_label is None):
            raise ValueError('classifier-free guidance needs a class-conditional model trained with a null label')
        if num == 0:
            # Nothing to solve or decode (the network's label checks and the decoder need a sample): the empty
            # result has the shape more images would have.
            channels, size = network.in_channels, network.img_size
            if self.autoencoder is not None:
                config = self.autoencoder.config
                channels, size = config['out_channels'], size * 2 ** (len(config['block_out_channels']) - 1)
            return torch.zeros(0, channels, size, size, device=device)
        shape = (num, network.in_channels, network.img_size, network.img_size)
        noise = torch.randn(shape, generator=generator).to(device)
        latents = dpm_solver_sample(self.noise_fn(labels, float(guidance)), noise, self.schedule,
                                    steps, order, options['data_prediction'], options['spacing'], progress)
        if self.autoencoder is not None:
            self.autoencoder.to(device)
            latents = self.autoencoder.decode(latents)
        return ((latents.float() + 1) / 2).clamp(0, 1)
