#!/usr/bin/env python
"""U-ViT training step, side by side in one run: math vs SDPA (vs xformers) attention, with and without gradient
checkpointing; step time and memory.

    python tools/analysis/benchmark_diffusion_training.py configs/uvit/uvit-small-p2_8xb16-500k_cifar10-32x32.py \
        --batch-size 32 [--device cuda --fp16]
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import tools._quiet  # noqa: E402,F401  (before the frameworks: their deprecation warnings)

import torch  # noqa: E402

from _benchmarking import (add_measurement_arguments, describe_device, median, model_to_measure,  # noqa: E402
                           round_speedups, side_by_side_throughput)
from sparsevit_mm.models.diffusion import UViTDiffusion  # noqa: E402
from sparsevit_mm.launch import one_line_errors  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='U-ViT training step: attention backends and checkpointing')
    add_measurement_arguments(parser)
    return parser.parse_args(argv)


def step_memory_mib(step, device: str) -> float:
    """Memory of one training step: the CUDA allocator's peak above the resident weights, or on CPU (where the
    allocator keeps no peak) the bytes of activations autograd saves for the backward pass, the part gradient
    checkpointing trades for recomputation."""
    if device.startswith('cuda'):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step(None)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    seen = {}

    def pack(tensor):
        seen[(tensor.untyped_storage().data_ptr(), tensor.dtype)] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        step(None)
    return sum(seen.values()) / 2 ** 20


def benchmark_diffusion_training(model, args):
    """U-ViT: training step time and peak memory with math vs SDPA (vs xformers) attention, with and without
    gradient checkpointing, side by side on one synthetic batch."""
    network = model.network
    shape = (args.batch_size, network.in_channels, network.img_size, network.img_size)
    x0 = torch.randn(shape, device=args.device)
    labels = torch.randint(0, max(1, network.num_classes - 1), (args.batch_size, ), device=args.device) \
        if network.num_classes > 0 else None
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-5)
    settings = {'math attention': ('math', False), 'sdpa': ('sdpa', False), 'sdpa + checkpointing': ('sdpa', True),
                'math + checkpointing': ('math', True)}
    if args.device.startswith('cuda'):
        try:
            import xformers  # noqa: F401
            settings['xformers'] = ('xformers', False)
        except ImportError:
            pass
    network.train()

    def step(_):
        with torch.autocast('cuda', torch.float16, enabled=args.fp16):
            t = model.schedule.sample_train_time(x0.shape[0], x0.device)
            noise = torch.randn_like(x0)
            alpha = torch.exp(model.schedule.log_alpha(t)).to(x0.dtype).view(-1, 1, 1, 1)
            sigma = model.schedule.sigma(t).to(x0.dtype).view(-1, 1, 1, 1)
            loss = (network(alpha * x0 + sigma * noise, model.schedule.network_time(t), labels).float()
                    - noise).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def prepare(backend, checkpointing):
        def run():
            network.set_attention(backend)
            network.with_cp = checkpointing
            return step
        return run

    results = side_by_side_throughput({name: prepare(*cfg) for name, cfg in settings.items()}, x0, args.rounds,
                                      args.iters, args.warmup, grad=True)
    memory = {}
    for name, cfg in settings.items():
        prepare(*cfg)()
        step(None)
        memory[name] = step_memory_mib(step, args.device)
    device = describe_device(args)
    speedups = round_speedups(results, 'math attention')
    print(f'U-ViT training step, batch {args.batch_size}, input {tuple(shape[1:])}, {device}'
          f'{", fp16" if args.fp16 else ""}, {args.rounds} interleaved rounds of {args.iters} steps')
    what = 'peak memory (MiB)' if args.device.startswith('cuda') else 'saved activations (MiB)'
    print(f'{"setting":>22} | {"steps/s":>8} | {"vs math":>7} | {what:>23}')
    table = {}
    for name in settings:
        per_second = median(results[name]) / args.batch_size
        table[name] = dict(steps_per_s=per_second, peak_mib=memory[name])
        print(f'{name:>22} | {per_second:>8.3f} | {median(speedups[name]):>6.2f}x | {memory[name]:>23.1f}')
    return table


def main(argv=None):
    args = parse_args(argv)
    model = model_to_measure(args, UViTDiffusion, 'benchmark_diffusion_training.py times UViTDiffusion training steps')
    return benchmark_diffusion_training(model, args)


if __name__ == '__main__':
    with one_line_errors():  # a bad value or file: its message, no traceback
        main()
