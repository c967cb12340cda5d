"""Multistep DPM-Solver (noise prediction) and DPM-Solver++ (data prediction), orders 1-3.

Lu et al., "DPM-Solver" (NeurIPS 2022) and "DPM-Solver++" (2022). Written against the schedules of
:mod:`.schedules` (``log_alpha``, ``sigma``, ``lambda_``, ``inverse_lambda``), so one solver serves the continuous
VP-SDE and the discrete Stable Diffusion schedule. The first steps warm up with lower orders (a multistep method
needs earlier model outputs), and with fewer than 15 steps the last steps lower the order again for stability.
"""
from typing import Callable, List, Optional

import torch
from tqdm import tqdm

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def time_steps(schedule, steps: int, spacing: str = 'logSNR') -> torch.Tensor:
    """``steps + 1`` times from T down to eps, uniform in half log-SNR (``'logSNR'``) or in time (``'time_uniform'``)."""
    t_start, t_end = schedule.sampling_range()
    if spacing == 'time_uniform':
        return torch.linspace(t_start, t_end, steps + 1, dtype=torch.float64)
    if spacing == 'logSNR':
        lam = torch.linspace(float(schedule.lambda_(torch.tensor(t_start, dtype=torch.float64))),
                             float(schedule.lambda_(torch.tensor(t_end, dtype=torch.float64))), steps + 1,
                             dtype=torch.float64)
        return schedule.inverse_lambda(lam)
    raise ValueError(f"time spacing must be 'logSNR' or 'time_uniform', got {spacing!r}")


def _update(schedule, x: torch.Tensor, outputs: List[torch.Tensor], times: List[torch.Tensor], t: torch.Tensor,
            order: int, data_prediction: bool) -> torch.Tensor:
    """One multistep update from times[-1] to t using the last ``order`` model outputs (newest last)."""
    lam = schedule.lambda_
    s0 = times[-1]
    h = lam(t) - lam(s0)
    m0 = outputs[-1]
    alpha_t, sigma_t = torch.exp(schedule.log_alpha(t)), schedule.sigma(t)
    if order >= 2:
        r0 = (lam(s0) - lam(times[-2])) / h
        d1_0 = (m0 - outputs[-2]) / r0
    if order == 3:
        r1 = (lam(times[-2]) - lam(times[-3])) / h
        d1_1 = (outputs[-2] - outputs[-3]) / r1
        d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
        d2 = (d1_0 - d1_1) / (r0 + r1)
    if data_prediction:  # DPM-Solver++
        phi_1 = torch.expm1(-h)
        x_t = (sigma_t / schedule.sigma(s0)) * x - alpha_t * phi_1 * m0
        if order == 2:
            x_t = x_t - 0.5 * alpha_t * phi_1 * d1_0
        elif order == 3:
            phi_2 = phi_1 / h + 1.0
            phi_3 = phi_2 / h - 0.5
            x_t = x_t + alpha_t * phi_2 * d1 - alpha_t * phi_3 * d2
    else:  # DPM-Solver (noise prediction)
        phi_1 = torch.expm1(h)
        x_t = torch.exp(schedule.log_alpha(t) - schedule.log_alpha(s0)) * x - sigma_t * phi_1 * m0
        if order == 2:
            x_t = x_t - 0.5 * sigma_t * phi_1 * d1_0
        elif order == 3:
            phi_2 = phi_1 / h - 1.0
            phi_3 = phi_2 / h - 0.5
            x_t = x_t - sigma_t * phi_2 * d1 - sigma_t * phi_3 * d2
    return x_t


@torch.no_grad()
def dpm_solver_sample(noise_fn: ModelFn, x: torch.Tensor, schedule, steps: int = 50, order: int = 3,
                      data_prediction: bool = False, spacing: str = 'logSNR', progress: bool = False,
                      times: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Solve the diffusion ODE from noise ``x`` (at t = T) to data with ``steps`` model evaluations.

    Args:
        noise_fn: ``(x_t, t) -> predicted noise``; ``t`` is a (B,) tensor of schedule times in (0, 1].
        data_prediction: DPM-Solver++ (the solver works on the predicted x_0; U-ViT's discrete models) instead of
            DPM-Solver (on the predicted noise; continuous models).
        times: an explicit grid of ``steps + 1`` decreasing schedule times (e.g. another sampler's), in place of
            ``spacing``'s.
    """
    if order not in (1, 2, 3):
        raise ValueError(f'DPM-Solver order must be 1, 2 or 3, got {order}')
    if times is not None:
        times = torch.as_tensor(times, dtype=torch.float64)
        if times.dim() != 1 or len(times) < 2 or not bool((times[1:] < times[:-1]).all()):
            raise ValueError(f'times must be a decreasing 1-D grid of at least 2 schedule times, got {times}')
        steps = len(times) - 1
    if steps < 1:
        raise ValueError(f'steps must be >= 1, got {steps}')
    times = (time_steps(schedule, steps, spacing) if times is None else times).to(x.device)

    def model(x_t, t):
        t_batch = t.expand(x_t.shape[0]).to(x_t.dtype)
        eps = noise_fn(x_t, t_batch)
        if not data_prediction:
            return eps
        return (x_t - schedule.sigma(t).to(x_t.dtype) * eps) / torch.exp(schedule.log_alpha(t)).to(x_t.dtype)

    outputs, history = [model(x, times[0])], [times[0]]
    for step in tqdm(range(1, steps + 1), desc='sampling', disable=not progress, leave=False):
        step_order = min(order, step, steps + 1 - step) if steps < 15 else min(order, step)
        x = _update(schedule, x, outputs, history, times[step], step_order, data_prediction).to(x.dtype)
        if step < steps:
            outputs.append(model(x, times[step]))
            history.append(times[step])
            outputs, history = outputs[-order:], history[-order:]
    return x
