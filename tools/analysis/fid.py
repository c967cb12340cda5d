#!/usr/bin/env python
"""Frechet Inception Distance between a folder of samples and a reference (folder or statistics file).

    python tools/analysis/fid.py samples/ reference/ --inception pretrained/inception_v3.pth
    python tools/analysis/fid.py samples/ fid_stats_cifar10.npz --inception pretrained/inception_v3.pth
    python tools/analysis/fid.py reference/ --save-stats ref_stats.npz --inception ...   # statistics only

Features: InceptionV3's 2048-d pool features (torchvision's architecture, images resized to 299). The weights are
read from a local file (torchvision's ``inception_v3`` state dict, e.g. ``inception_v3_google-0cc3c7bd.pth``);
nothing is downloaded. FIDs computed with torchvision's weights differ slightly from pytorch-fid's (TF-ported)
numbers: compare only like with like. Statistics files hold ``mu`` and ``sigma`` (the pytorch-fid format).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import tools._quiet  # noqa: E402,F401  (before the frameworks: their deprecation warnings)
from sparsevit_mm.launch import one_line_errors  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402
from tqdm import tqdm  # noqa: E402

IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.bmp', '.webp')


def load_inception(path: str, device: str) -> torch.nn.Module:
    if not path or not os.path.isfile(path):
        raise FileNotFoundError(
            f'FID needs InceptionV3 weights from a local file, got {path!r}: give --inception PATH with torchvision\'s '
            'inception_v3 state dict (inception_v3_google-0cc3c7bd.pth); nothing is downloaded at run time')
    from torchvision.models import inception_v3

    from sparsevit_mm.utils.checkpoint import load_state_dict_file, load_weights
    model = inception_v3(weights=None, aux_logits=False, init_weights=False)
    state = {k: v for k, v in load_state_dict_file(path).items() if not k.startswith('AuxLogits.')}
    load_weights(model, state, source=path)
    model.fc = torch.nn.Identity()
    return model.to(device).eval()


def image_files(folder: str):
    files = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.lower().endswith(IMAGE_SUFFIXES))
    if len(files) < 2:
        raise ValueError(f'{folder} has {len(files)} images; FID needs at least 2 (50,000 for reportable numbers)')
    return files


@torch.no_grad()
def folder_features(model, folder: str, batch_size: int, device: str) -> np.ndarray:
    mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1)
    files = image_files(folder)
    features = []
    for start in tqdm(range(0, len(files), batch_size), desc=f'features of {folder}', leave=False):
        batch = [torch.from_numpy(np.asarray(Image.open(f).convert('RGB'))).permute(2, 0, 1)
                 for f in files[start:start + batch_size]]
        x = torch.stack([F.interpolate(b[None].float(), size=(299, 299), mode='bilinear', align_corners=False)[0]
                         for b in batch]).to(device) / 255.0
        features.append(model((x - mean) / std).cpu().double().numpy())
    return np.concatenate(features)


def statistics(features: np.ndarray):
    return features.mean(0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr(sqrt(S1 S2)).

    tr(sqrt(S1 S2)) is the sum of the singular values of sqrt(S2) sqrt(S1) (the square roots of the eigenvalues of
    sqrt(S1) S2 sqrt(S1)), taken from the SVD of that product rather than from the eigenvalues of the squared form:
    with singular covariances (fewer images than dimensions) the squared form's rounding noise, about eps * |S|^2 on
    each null direction, would come back through the square root as sqrt(eps) * |S| per direction (on features as
    large as an untrained Inception's, 1e17 in an FID of 1e22), where the SVD's stays near eps * |S|.
    """
    def psd_root(sigma):
        values, vectors = np.linalg.eigh(sigma)
        return (vectors * np.sqrt(values.clip(min=0))) @ vectors.T

    trace_root = np.linalg.svd(psd_root(sigma2) @ psd_root(sigma1), compute_uv=False).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_root)


def reference_statistics(model, reference: str, batch_size: int, device: str):
    if reference.endswith('.npz'):
        stats = np.load(reference)
        if 'mu' not in stats or 'sigma' not in stats:
            raise ValueError(f'{reference} must hold arrays "mu" and "sigma" (pytorch-fid statistics)')
        return stats['mu'], stats['sigma']
    return statistics(folder_features(model, reference, batch_size, device))


def main(argv=None):
    parser = argparse.ArgumentParser(description='FID of a sample folder against a reference folder or statistics')
    parser.add_argument('samples', help='folder of generated images')
    parser.add_argument('reference', nargs='?', help='folder of reference images or a .npz with mu / sigma')
    parser.add_argument('--inception', required=True, help='local InceptionV3 weights (torchvision state dict)')
    parser.add_argument('--batch-size', type=int, default=50, help='images per Inception forward pass')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu',
                        help='cuda or cpu (default: cuda when available)')
    parser.add_argument('--save-stats', help='also write the samples\' statistics to this .npz')
    args = parser.parse_args(argv)
    model = load_inception(args.inception, args.device)
    mu, sigma = statistics(folder_features(model, args.samples, args.batch_size, args.device))
    if args.save_stats:
        np.savez(args.save_stats, mu=mu, sigma=sigma)
        print(f'wrote {args.save_stats}')
    if args.reference is None:
        return None
    fid = frechet_distance(mu, sigma, *reference_statistics(model, args.reference, args.batch_size, args.device))
    print(f'FID: {fid:.4f}')
    return fid


if __name__ == '__main__':
    with one_line_errors():  # a bad value or file: its message, no traceback
        main()
