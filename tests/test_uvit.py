"""U-ViT: archs, official checkpoints, schedules, loss, guidance, sampler, tools, segmentation backbone, bad input."""
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from sparsevit_mm.apis import convert_official
from sparsevit_mm.models import UViT, UViTDiffusion
from sparsevit_mm.models.diffusion import DiscreteSchedule, VPSchedule, dpm_solver_sample

from .helpers import REPO, TINY_UVIT, load_tool, make_imagenet_folder, run_tool, uvit_config
from .reference.official_uvit import official_uvit_forward


@pytest.mark.parametrize('arch,kwargs,params,keys', [
    ('small', dict(img_size=32, patch_size=2), 44.26, 164),
    ('mid', dict(img_size=64, patch_size=4, num_classes=1000), 130.94, 213),
    ('large', dict(img_size=32, patch_size=2, in_channels=4, num_classes=1001), 286.76, 261),
    ('huge', dict(img_size=32, patch_size=2, in_channels=4, num_classes=1001), 500.83, 355)])
def test_arch_parameters_keys_and_shapes(arch, kwargs, params, keys):
    model = UViT(arch, **kwargs)
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(params, abs=0.006)
    assert len(model.state_dict()) == keys
    assert (arch == 'huge') == isinstance(model.final_layer, torch.nn.Identity)
    if arch == 'small':
        x = torch.randn(2, 3, 32, 32)
        assert model(x, torch.tensor([1.0, 500.0])).shape == x.shape


@pytest.mark.parametrize('num_classes,conv', [(0, True), (11, False)])
def test_official_checkpoint_reproduces_the_network_output(num_classes, conv):
    torch.manual_seed(0)
    source = UViT(TINY_UVIT, img_size=16, patch_size=2, in_channels=4, num_classes=num_classes, conv=conv)
    source.init_weights()
    official = {k: v + 0.02 * torch.randn_like(v) for k, v in source.state_dict().items()}
    converted, model_cfg, notes = convert_official(official)
    assert model_cfg['network']['num_classes'] == num_classes and model_cfg['network']['conv'] == conv
    # not stored in checkpoints: 64 is no official width, so the head count was guessed and the notes say so
    assert model_cfg['network']['arch']['num_heads'] == 1 and 'num_heads=1 was inferred' in notes[0]
    converted, model_cfg, notes = convert_official(official, num_heads=4)
    assert model_cfg['network']['arch']['num_heads'] == 4 and notes == []
    model = UViTDiffusion(**{k: v for k, v in model_cfg.items() if k != 'type'})
    model.load_state_dict(converted)
    x = torch.randn(3, 4, 16, 16)
    t = torch.tensor([3.0, 400.0, 999.0])
    labels = torch.tensor([0, 5, 10]) if num_classes else None
    with torch.no_grad():
        ours = model.network(x, t, labels)
    expected = official_uvit_forward(official, x, t, labels, heads=4, patch=2)
    assert torch.allclose(ours, expected, atol=1e-5), (ours - expected).abs().max()


def test_schedules_match_their_formulas():
    vp = VPSchedule()
    t = torch.linspace(0.01, 1, 50, dtype=torch.float64)
    assert torch.allclose(vp.alpha_bar(t), torch.exp(-(0.1 * t + 9.95 * t ** 2)))
    assert torch.allclose(vp.inverse_lambda(vp.lambda_(t)), t, atol=1e-8)
    assert torch.allclose(vp.network_time(torch.tensor([0.5])), torch.tensor([499.5]))
    discrete = DiscreteSchedule()
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    n = torch.tensor([1, 10, 500, 1000], dtype=torch.float64)
    assert torch.allclose(discrete.alpha_bar(n / 1000.0), torch.cumprod(1 - betas, 0)[n.long() - 1])
    assert torch.allclose(discrete.inverse_lambda(discrete.lambda_(n / 1000.0)), n / 1000.0, atol=1e-6)
    assert discrete.network_time(torch.tensor([0.5])).item() == 500.0


def tiny_model(**kwargs):
    network = dict(type='UViT', arch=TINY_UVIT, img_size=16, patch_size=4, num_classes=kwargs.pop('num_classes', 0))
    model = UViTDiffusion(network=network, **kwargs)
    model.network.init_weights()
    return model


@pytest.mark.parametrize('schedule', ['continuous', 'discrete'])
def test_loss_is_the_noise_mse(schedule):
    model = tiny_model(schedule=schedule)
    x0 = torch.rand(4, 3, 16, 16) * 2 - 1
    torch.manual_seed(7)
    loss = model.loss(x0)['loss']
    torch.manual_seed(7)
    t = model.schedule.sample_train_time(4, 'cpu')
    noise = torch.randn_like(x0)
    alpha = torch.exp(model.schedule.log_alpha(t)).float().view(-1, 1, 1, 1)
    sigma = model.schedule.sigma(t).float().view(-1, 1, 1, 1)
    with torch.no_grad():
        predicted = model.network(alpha * x0 + sigma * noise, model.schedule.network_time(t))
    assert loss.item() == pytest.approx(((predicted - noise) ** 2).mean().item(), rel=1e-5)
    if schedule == 'discrete':
        n = t * 1000
        assert torch.allclose(n, n.round()) and n.min() >= 1 and n.max() <= 1000


def test_classifier_free_guidance_dropout_rate():
    model = tiny_model(num_classes=6, p_uncond=0.15)
    labels = torch.randint(0, 5, (40000, ))
    dropped = model.drop_labels(labels)
    assert model.null_label == 5
    rate = (dropped == 5).float().mean().item()
    assert rate == pytest.approx(0.15, abs=0.01)
    assert torch.equal(dropped[dropped != 5], labels[dropped != 5])


@pytest.mark.parametrize('schedule,data_prediction', [(VPSchedule(), False), (DiscreteSchedule(), True)])
def test_dpm_solver_reaches_a_gaussian_in_few_steps(schedule, data_prediction):
    """Data N(mu, s^2): the exact noise predictor is known, so the ODE's answer is too."""
    mu, s = 1.5, 0.3

    def exact_noise(x, t):
        alpha = torch.exp(schedule.log_alpha(t)).view(-1, 1).to(x)
        sigma = schedule.sigma(t).view(-1, 1).to(x)
        return sigma * (x - alpha * mu) / (alpha ** 2 * s ** 2 + sigma ** 2)

    t_start, t_end = schedule.sampling_range()
    a_start = float(torch.exp(schedule.log_alpha(torch.tensor(t_start, dtype=torch.float64))))
    s_start = float(schedule.sigma(torch.tensor(t_start, dtype=torch.float64)))
    a_end = float(torch.exp(schedule.log_alpha(torch.tensor(t_end, dtype=torch.float64))))
    s_end = float(schedule.sigma(torch.tensor(t_end, dtype=torch.float64)))
    target_std = (a_end ** 2 * s ** 2 + s_end ** 2) ** 0.5
    errors = {}
    for steps in (10, 20, 50):
        torch.manual_seed(0)
        x = a_start * mu + (a_start ** 2 * s ** 2 + s_start ** 2) ** 0.5 * torch.randn(20000, 4)
        y = dpm_solver_sample(exact_noise, x, schedule, steps=steps, order=3, data_prediction=data_prediction)
        errors[steps] = abs(y.std().item() - target_std)
        assert y.mean().item() == pytest.approx(a_end * mu, abs=0.01)
    assert errors[20] < 0.01 and errors[50] < 0.01
    assert errors[50] <= errors[10] + 1e-3, errors


def test_bad_input_raises_clear_errors():
    with pytest.raises(ValueError, match='image size 30 is not a multiple of the patch size 4'):
        UViT(TINY_UVIT, img_size=30, patch_size=4)
    with pytest.raises(ValueError, match="unknown arch 'giant'"):
        UViT('giant')
    conditional = tiny_model(num_classes=6, p_uncond=0.1)
    with pytest.raises(ValueError, match=r'labels must lie in \[0, 6\)'):
        conditional.network(torch.randn(1, 3, 16, 16), torch.tensor([1.0]), torch.tensor([9]))
    with pytest.raises(ValueError, match=r'labels must be one value or 2 values in \[0, 5\)'):
        conditional.sample(2, labels=[1, 5], steps=2)
    with pytest.raises(ValueError, match='built for 3x16x16'):
        conditional.network(torch.randn(1, 3, 20, 20), torch.tensor([1.0]), torch.tensor([1]))
    unconditional = tiny_model()
    with pytest.raises(ValueError, match='guidance needs a class-conditional model'):
        unconditional.sample(2, guidance=1.0, steps=2)
    with pytest.raises(ValueError, match='p_uncond > 0'):
        tiny_model(p_uncond=0.1)
    with pytest.raises(ValueError, match='needs a checkpoint'):
        tiny_model(autoencoder=dict(checkpoint=None))


def test_latent_model_with_an_autoencoder_from_a_local_file(tmp_path):
    from sparsevit_mm.models.diffusion import SDAutoencoder
    config = dict(block_out_channels=(32, 32), down_block_types=('DownEncoderBlock2D', ) * 2,
                  up_block_types=('UpDecoderBlock2D', ) * 2, norm_num_groups=8, layers_per_block=1)
    vae = SDAutoencoder(None, config=config, random_init=True)
    torch.save(vae.model.state_dict(), tmp_path / 'vae.pth')
    model = UViTDiffusion(network=dict(type='UViT', arch=TINY_UVIT, img_size=8, patch_size=2, in_channels=4,
                                       num_classes=4),
                          schedule='discrete', p_uncond=0.1,
                          autoencoder=dict(checkpoint=str(tmp_path / 'vae.pth'), config=config))
    assert not any(k.startswith('autoencoder') for k in model.state_dict()), 'the frozen VAE is not saved with us'
    from mmpretrain.structures import DataSample
    loss = model.loss(torch.rand(2, 3, 16, 16) * 2 - 1, [DataSample().set_gt_label(1), DataSample().set_gt_label(2)])
    assert torch.isfinite(loss['loss'])
    images = model.sample(2, labels=1, guidance=0.4, steps=3)
    assert images.shape == (2, 3, 16, 16) and 0 <= images.min() and images.max() <= 1
    with pytest.raises(FileNotFoundError, match='autoencoder checkpoint'):
        SDAutoencoder(str(tmp_path / 'missing.pth'), config=config)


def test_uvit_backbone_in_mmseg_upernet():
    from mmengine.model import revert_sync_batchnorm
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import MODELS, DefaultScope
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample

    from sparsevit_mm.utils.config import load_config
    cfg = load_config('configs/uvit/upernet_uvit-small-p16_8xb2-160k_ade20k-512x512.py')
    cfg.model.data_preprocessor.size = (128, 128)
    with DefaultScope.overwrite_default_scope('mmseg'):
        model = revert_sync_batchnorm(MODELS.build(cfg.model))
        optim_wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    model.init_weights()
    samples = []
    for _ in range(2):
        sample = SegDataSample(gt_sem_seg=PixelData(data=torch.randint(0, 150, (1, 128, 128))))
        sample.set_metainfo(dict(img_shape=(128, 128), ori_shape=(128, 128), pad_shape=(128, 128)))
        samples.append(sample)
    with torch.no_grad():
        feature, = model.backbone(torch.randn(1, 3, 128, 128))  # one stride-16 map
        features = model.neck((feature, ))  # SimpleFeaturePyramid
    assert tuple(feature.shape) == (1, 512, 8, 8)
    assert [tuple(f.shape[-2:]) for f in features] == [(32, 32), (16, 16), (8, 8), (4, 4)]
    data = dict(inputs=[torch.randint(0, 255, (3, 128, 128), dtype=torch.uint8) for _ in samples],
                data_samples=samples)
    with DefaultScope.overwrite_default_scope('mmseg'):
        log_vars = model.train_step(data, optim_wrapper)
    assert torch.isfinite(log_vars['decode.loss_ce'])


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp('uvit')
    data = make_imagenet_folder(root / 'data', num_classes=2, per_class=16, splits=('train', ))
    config = root / 'uvit.py'
    config.write_text(uvit_config(data, root / 'work', max_iters=200))
    run_tool('tools/train.py', config)
    return root, config


def _losses(work_dir):
    files = sorted(Path(work_dir).glob('*/vis_data/scalars.json'))
    return [json.loads(line)['loss'] for f in files for line in f.read_text().splitlines() if '"loss"' in line]


@pytest.mark.slow
def test_training_lowers_the_loss_and_resumes(trained):
    root, config = trained
    losses = _losses(root / 'work')
    assert len(losses) >= 10
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3]), losses
    out = run_tool('tools/train.py', config, '--resume', '--cfg-options', 'train_cfg.max_iters=220')
    assert 'resumed' in (out.stdout + out.stderr).lower()
    assert torch.load(root / 'work' / 'iter_220.pth', weights_only=False)['meta']['iter'] == 220


@pytest.mark.slow
def test_sample_tool_writes_images_and_a_grid(trained):
    root, config = trained
    out_dir = root / 'samples'
    out = run_tool('tools/sample.py', config, root / 'work' / 'iter_200.pth', '--num', '6', '--out', out_dir,
                   '--steps', '5', '--batch-size', '4')
    assert 'EMA weights' in out.stdout
    pngs = sorted(out_dir.glob('0*.png'))
    assert len(pngs) == 6 and (out_dir / 'grid.png').is_file()
    from PIL import Image
    with Image.open(pngs[0]) as image:
        assert image.size == (32, 32)


@pytest.mark.slow
def test_fid_tool_on_two_folders(trained, tmp_path):
    root, _ = trained
    from torchvision.models import inception_v3
    torch.manual_seed(0)
    torch.save(inception_v3(weights=None, aux_logits=False, init_weights=True).state_dict(), tmp_path / 'inc.pth')
    reference = root / 'data' / 'train' / 'class_0'
    out = run_tool('tools/analysis/fid.py', reference, root / 'data' / 'train' / 'class_1', '--inception',
                   tmp_path / 'inc.pth', '--batch-size', '8', '--save-stats', tmp_path / 'stats.npz')
    fid = float(re.search(r'FID: ([-\d.e+]+)', out.stdout).group(1))
    assert fid > 0
    same = run_tool('tools/analysis/fid.py', reference, tmp_path / 'stats.npz', '--inception', tmp_path / 'inc.pth')
    # (an untrained Inception gives huge features, so "zero" is relative to the FID between the two folders)
    assert abs(float(re.search(r'FID: ([-\d.e+]+)', same.stdout).group(1))) < 1e-6 * fid
    with pytest.raises(AssertionError, match='InceptionV3 weights from a local file'):
        run_tool('tools/analysis/fid.py', reference, reference, '--inception', tmp_path / 'missing.pth')


def test_frechet_distance_matches_the_matrix_square_root_formula():
    from scipy import linalg
    fid_tool = load_tool('tools/analysis/fid.py')
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(400, 6)), rng.normal(size=(400, 6)) * 1.5 + 0.3
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    expected = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(
        linalg.sqrtm(s1 @ s2).real)
    assert fid_tool.frechet_distance(a.mean(0), s1, b.mean(0), s2) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_of_singular_statistics_to_themselves_is_zero_to_rounding():
    """Fewer images than dimensions and features as large as an untrained Inception's: the covariance is singular
    and about 1e22; the distance of the statistics to themselves is rounding only (eps * |S|, not sqrt(eps) * |S|)."""
    fid_tool = load_tool('tools/analysis/fid.py')
    features = np.random.default_rng(0).normal(size=(16, 256)) * 1e11
    mean, covariance = features.mean(0), np.cov(features, rowvar=False)
    assert abs(fid_tool.frechet_distance(mean, covariance, mean, covariance)) < 1e-12 * np.trace(covariance)


@pytest.mark.slow
def test_training_benchmark_compares_attention_and_checkpointing(tmp_path):
    config = tmp_path / 'uvit_narrow.py'  # the CIFAR-10 recipe with a narrower, shallower network (same code paths)
    config.write_text(f"_base_ = ['{(REPO / 'configs/uvit/uvit-small-p2_8xb16-500k_cifar10-32x32.py').as_posix()}']\n"
                      "model = dict(network=dict(arch=dict(_delete_=True, embed_dims=128, depth=6, num_heads=4)))\n")
    out = run_tool('tools/analysis/benchmark_diffusion_training.py', config, '--batch-size', '2', '--rounds', '1',
                   '--iters', '1', '--warmup', '1')
    rows = dict(re.findall(r'^\s*([a-z +]+?) \|\s+[\d.]+ \|\s+[\d.]+x \|\s+([\d.]+)$', out.stdout, re.M))
    assert set(rows) >= {'math attention', 'sdpa', 'sdpa + checkpointing'}
    assert float(rows['sdpa + checkpointing']) < 0.5 * float(rows['sdpa'])


OFFICIAL_UVIT_PARAMS = {  # millions, counted on the official U-ViT networks of each config
    'uvit-small-p2_8xb16-500k_cifar10-32x32': 44.26,
    'uvit-mid-p4_8xb128-300k_imagenet-64x64': 130.94,
    'uvit-large-p4_8xb128-300k_imagenet-64x64': 286.83,
    'uvit-large-p2_8xb128-300k_imagenet-256x256-latent': 286.76,
    'uvit-huge-p2_8xb128-500k_imagenet-256x256-latent': 500.83,
    'uvit-large-p4_8xb128-500k_imagenet-512x512-latent': 286.86,
    'uvit-huge-p4_8xb128-500k_imagenet-512x512-latent': 500.94,
}


@pytest.mark.parametrize('path', sorted((REPO / 'configs/uvit').glob('uvit-*.py')), ids=lambda p: p.stem)
def test_diffusion_configs_build(path):
    from mmengine.registry import MODELS, DefaultScope

    from sparsevit_mm.utils.config import load_config
    cfg = load_config(str(path))
    if cfg.model.get('autoencoder'):  # the Stable Diffusion weights are a user's local file; structure only here
        assert cfg.model.autoencoder.scale_factor == 0.18215
        cfg.model.autoencoder = dict(checkpoint=None, random_init=True)
    with DefaultScope.overwrite_default_scope(cfg.default_scope):
        model = MODELS.build(cfg.model)
    network = model.network
    # the official networks' sizes (their parameter counts, research notes), not our config's own numbers
    official = OFFICIAL_UVIT_PARAMS[path.stem]
    assert sum(p.numel() for p in network.parameters()) / 1e6 == pytest.approx(official, abs=0.01)
    assert (model.schedule_kind == 'discrete') == ('huge' in path.stem)
    assert model.p_uncond == (0.0 if network.num_classes in (0, 1000) else (0.1 if 'huge' in path.stem else 0.15))


@pytest.mark.parametrize('order', [1, 2, 3])
@pytest.mark.parametrize('data_prediction', [False, True])
@pytest.mark.parametrize('steps', [10, 20])
def test_dpm_solver_equals_diffusers_multistep_scheduler(order, data_prediction, steps):
    """Our solver and diffusers' DPMSolverMultistepScheduler on the same noise-prediction function, schedule (Stable
    Diffusion's scaled-linear), time grid, orders and step counts give the same samples."""
    from diffusers import DPMSolverMultistepScheduler
    scheduler = DPMSolverMultistepScheduler(
        beta_schedule='scaled_linear', beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000,
        solver_order=order, algorithm_type='dpmsolver++' if data_prediction else 'dpmsolver',
        solver_type='midpoint', final_sigmas_type='sigma_min', timestep_spacing='linspace')
    scheduler.set_timesteps(steps)
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(4, 4, generator=generator, dtype=torch.float64) / 2

    def noise_at_step(x, step):  # a smooth stand-in for a network, given diffusers' 0-based training step
        return torch.tanh(torch.einsum('bchw,cd->bdhw', x, weight) + step.view(-1, 1, 1, 1) / 1000.0)

    x = torch.randn(2, 4, 8, 8, generator=generator, dtype=torch.float64)
    theirs = x.clone()
    for step in scheduler.timesteps:
        eps = noise_at_step(theirs, torch.full((2, ), float(step), dtype=torch.float64))
        theirs = scheduler.step(eps, step, theirs).prev_sample
    schedule = DiscreteSchedule()
    # diffusers' step k is our t = (k + 1) / 1000; its last update goes to step 0 (final_sigmas_type='sigma_min')
    times = torch.tensor([*(scheduler.timesteps.double() + 1), 1.0]) / 1000
    ours = dpm_solver_sample(lambda x_t, t: noise_at_step(x_t, (t * 1000).round() - 1), x, schedule, order=order,
                             data_prediction=data_prediction, times=times)
    assert (ours - theirs).abs().max() / theirs.abs().max() < 1e-5
