"""Noise schedules of U-ViT: the continuous VP-SDE and Stable Diffusion's discrete scaled-linear schedule.

Both expose the same view for training and for DPM-Solver: for a time t in (0, 1], ``log_alpha(t)`` (the signal
scale, alpha_bar = alpha^2), ``sigma(t) = sqrt(1 - alpha^2)``, the half log-SNR ``lambda(t) = log(alpha / sigma)``
and its inverse, and ``network_time(t)``, the timestep value the network was trained with.
"""
import torch


class NoiseSchedule:
    """What every schedule derives from ``log_alpha(t)``: alpha_bar, sigma and the half log-SNR lambda."""

    def log_alpha(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        return torch.exp(2 * self.log_alpha(t))

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(-torch.expm1(2 * self.log_alpha(t)))

    def lambda_(self, t: torch.Tensor) -> torch.Tensor:
        log_alpha = self.log_alpha(t)
        return log_alpha - 0.5 * torch.log(-torch.expm1(2 * log_alpha))


class VPSchedule(NoiseSchedule):
    """Continuous variance-preserving SDE with linear beta(t) = beta_0 + t (beta_1 - beta_0), t in [0, 1].

    alpha_bar(t) = exp(-(beta_0 t + (beta_1 - beta_0) t^2 / 2)); the network sees 999 t. Training draws t ~ U(0, 1).
    """
    continuous = True

    def __init__(self, beta_0: float = 0.1, beta_1: float = 20.0):
        self.beta_0, self.beta_1 = beta_0, beta_1

    def log_alpha(self, t: torch.Tensor) -> torch.Tensor:
        return -0.25 * t ** 2 * (self.beta_1 - self.beta_0) - 0.5 * t * self.beta_0

    def inverse_lambda(self, lam: torch.Tensor) -> torch.Tensor:
        tmp = 2 * (self.beta_1 - self.beta_0) * torch.logaddexp(-2 * lam, torch.zeros_like(lam))
        delta = self.beta_0 ** 2 + tmp
        return tmp / (torch.sqrt(delta) + self.beta_0) / (self.beta_1 - self.beta_0)

    def network_time(self, t: torch.Tensor) -> torch.Tensor:
        return 999.0 * t

    def sample_train_time(self, batch: int, device) -> torch.Tensor:
        return torch.rand(batch, device=device)

    def sampling_range(self):
        """(T, eps): sampling goes from t = T down to t = eps."""
        return 1.0, 1e-4


class DiscreteSchedule(NoiseSchedule):
    """Stable Diffusion's scaled-linear schedule: beta_n = linspace(sqrt(0.00085), sqrt(0.012), N)^2, N = 1000.

    Step n in {1..N} has alpha_bar_n = prod_{i<=n} (1 - beta_i) and is time t = n / N; the network sees n. For the
    solver, log(alpha) is interpolated piecewise-linearly in t between the steps.
    """
    continuous = False

    def __init__(self, beta_start: float = 0.00085, beta_end: float = 0.012, num_steps: int = 1000):
        betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_steps, dtype=torch.float64) ** 2
        self.num_steps = num_steps
        self.alphas_cumprod = torch.cumprod(1 - betas, dim=0)
        self.t_array = torch.linspace(0, 1, num_steps + 1, dtype=torch.float64)[1:]
        self.log_alpha_array = 0.5 * torch.log(self.alphas_cumprod)

    @staticmethod
    def _interp(x: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        """Piecewise-linear interpolation (extrapolating the end segments); xs increasing."""
        xs, ys = xs.to(x.device), ys.to(x.device)
        index = torch.searchsorted(xs, x.double().clamp(xs[0], xs[-1])).clamp(1, len(xs) - 1)
        x0, x1, y0, y1 = xs[index - 1], xs[index], ys[index - 1], ys[index]
        return (y0 + (y1 - y0) * (x.double() - x0) / (x1 - x0)).to(x.dtype)

    def log_alpha(self, t: torch.Tensor) -> torch.Tensor:
        return self._interp(t, self.t_array, self.log_alpha_array)

    def inverse_lambda(self, lam: torch.Tensor) -> torch.Tensor:
        log_alpha = -0.5 * torch.logaddexp(torch.zeros_like(lam), -2 * lam)
        return self._interp(log_alpha, self.log_alpha_array.flip(0),
                            self.t_array.flip(0))

    def network_time(self, t: torch.Tensor) -> torch.Tensor:
        return t * self.num_steps

    def sample_train_time(self, batch: int, device) -> torch.Tensor:
        """t = n / N with n uniform in {1..N}."""
        return torch.randint(1, self.num_steps + 1, (batch, ), device=device).float() / self.num_steps

    def sampling_range(self):
        return 1.0, 1.0 / self.num_steps


def build_schedule(kind: str):
    if kind == 'continuous':
        return VPSchedule()
    if kind == 'discrete':
        return DiscreteSchedule()
    raise ValueError(f"schedule must be 'continuous' (VP-SDE) or 'discrete' (Stable Diffusion), got {kind!r}")
