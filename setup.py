"""sparsevit-mm: dynamic, input-adaptive vision backbones for OpenMMLab 2.x."""
from pathlib import Path

from setuptools import find_packages, setup


def read_version():
    namespace = {}
    exec((Path(__file__).parent / 'sparsevit_mm' / 'version.py').read_text(), namespace)
    return namespace['__version__']


DEPLOY = ['onnx>=1.16', 'onnxscript>=0.2', 'onnxruntime>=1.18']

setup(
    name='sparsevit_mm',
    version=read_version(),
    description='Token-sparse and early-exit vision backbones (DynamicViT, DynamicSwin/ConvNeXt, DVT, U-ViT) '
    'for mmpretrain, mmdet and mmsegmentation',
    long_description=(Path(__file__).parent / 'README.md').read_text(encoding='utf-8'),
    long_description_content_type='text/markdown',
    packages=find_packages(include=['sparsevit_mm', 'sparsevit_mm.*']),
    python_requires='>=3.10',
    install_requires=[
        # tested on 2.14.1 (tools/install.sh pins it) and 2.11 (an existing environment: install.sh --offline)
        'torch>=2.11',
        'torchvision>=0.26',
        'mmengine==0.10.7',
        # mmcv must carry its compiled ops; tools/install.sh builds that wheel (PyPI has only the source).
        'mmcv==2.1.0',
        'mmdet==3.3.0',
        'mmsegmentation==1.2.2',
        'mmpretrain==1.2.0',
        'timm>=1.0,<2',
        'numpy',
        'matplotlib',
        'tqdm',
        # mmdet / mmseg / mmpretrain import these at registration time but do not all declare them.
        'pycocotools',
        'ftfy',
        'regex',
        'einops',
        # U-ViT's latent space (Stable Diffusion's KL autoencoder) and FID's matrix square root
        'diffusers>=0.30',
        'scipy',
        'shapely',
        'terminaltables',
        'prettytable',
        'modelindex',
    ],
    extras_require={
        # ONNX export (torch's torch.export-based exporter needs onnx and onnxscript) and ONNX Runtime (CPU)
        'deploy': DEPLOY,
        # the test environment (tools/install.sh) includes the deploy extra, so the export tests run
        'tests': ['pytest>=7', 'pytest-timeout', 'pytest-xdist', *DEPLOY],
        # Memory-efficient attention on CUDA machines; never required.
        'xformers': ['xformers'],
    },
    license='Apache-2.0',
    classifiers=['Programming Language :: Python :: 3', 'Topic :: Scientific/Engineering :: Artificial Intelligence'],
)
