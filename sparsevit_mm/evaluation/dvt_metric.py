"""Evaluation of early-exit models: accuracy, where samples left, expected cost, and per-exit (anytime) accuracy."""
from typing import List, Optional, Sequence

import torch
from mmengine.evaluator import BaseMetric


class EarlyExitMetric(BaseMetric):
    """Top-1 of the early-exit predictions, the fraction of samples leaving at each exit, and the expected GFLOPs
    per image (sum over exits of fraction x cumulative cost, as the DVT paper reports it). With DVT's
    ``test_cfg=dict(mode='anytime')`` it also reports each exit's own top-1 (every exit run on every sample).

    Keys: ``top1``, ``exit{k}_fraction``, ``gflops`` (when the model knows its exit costs), ``exit{k}_top1``.
    """
    default_prefix = 'early_exit'

    def __init__(self, collect_device: str = 'cpu', prefix: Optional[str] = None):
        super().__init__(collect_device=collect_device, prefix=prefix)

    def process(self, data_batch, data_samples: Sequence[dict]):
        for sample in data_samples:
            result = dict(label=int(sample['gt_label'][0]), pred=int(sample['pred_label'][0]),
                          exit=int(sample['exit_index']), gflops=list(sample.get('exit_gflops', [])))
            if 'exit_scores' in sample:
                result['exit_preds'] = sample['exit_scores'].argmax(-1).tolist()
            self.results.append(result)

    def compute_metrics(self, results: List[dict]) -> dict:
        num = len(results)
        metrics = {'top1': 100.0 * sum(r['label'] == r['pred'] for r in results) / num}
        num_exits = max(len(r['gflops']) for r in results) or 1 + max(r['exit'] for r in results)
        exits = torch.tensor([r['exit'] for r in results])
        for k in range(num_exits):
            metrics[f'exit{k + 1}_fraction'] = float((exits == k).float().mean())
        costs = results[0]['gflops']
        if costs and any(costs):
            metrics['gflops'] = sum(metrics[f'exit{k + 1}_fraction'] * costs[k] for k in range(len(costs)))
        if all('exit_preds' in r for r in results):
            for k in range(num_exits):
                metrics[f'exit{k + 1}_top1'] = 100.0 * sum(r['exit_preds'][k] == r['label'] for r in results) / num
        return metrics
