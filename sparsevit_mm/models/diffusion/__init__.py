from .autoencoder import SDAutoencoder
from .dpm_solver import dpm_solver_sample
from .schedules import DiscreteSchedule, VPSchedule, build_schedule
from .uvit_diffusion import UViTDiffusion

__all__ = ['SDAutoencoder', 'dpm_solver_sample', 'DiscreteSchedule', 'VPSchedule', 'build_schedule', 'UViTDiffusion']
