"""The frameworks' own inferencers (mmdet's DetInferencer, mmseg's MMSegInferencer, mmpretrain's
ImageClassificationInferencer) on our configs and checkpoints: predictions of the right form, pictures written, and
a checkpoint that does not fit refused with the key named (they load through mmengine's load_checkpoint)."""
import numpy as np
import pytest
import torch
from PIL import Image

from sparsevit_mm.apis import init_model
from sparsevit_mm.utils import CheckpointMismatchError

from .helpers import (detection_config, make_ade, make_coco, make_imagenet_folder, segmentation_config,
                      tiny_classifier_config)

HEIGHT, WIDTH = 120, 160


@pytest.fixture
def image(tmp_path):
    path = tmp_path / 'photo.png'
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (HEIGHT, WIDTH, 3), dtype=np.uint8)).save(path)
    return str(path)


def config_and_weights(tmp_path, text):
    """The config file and a checkpoint of the model it builds (random init)."""
    config = tmp_path / 'model.py'
    config.write_text(text)
    model = init_model(str(config))
    weights = tmp_path / 'model.pth'
    torch.save({'state_dict': model.state_dict(), 'meta': {}}, weights)
    return str(config), weights, model.state_dict()


@pytest.mark.slow
def test_det_inferencer_on_a_dynamic_swin_mask_rcnn(tmp_path, image):
    from mmdet.apis import DetInferencer
    text = detection_config('swin', make_coco(tmp_path / 'coco', num_images=2), tmp_path / 'work')
    config, weights, state = config_and_weights(tmp_path, text)
    inferencer = DetInferencer(model=config, weights=str(weights), device='cpu', show_progress=False)
    result = inferencer(image, out_dir=str(tmp_path / 'out'), no_save_pred=False)
    prediction, = result['predictions']
    assert len(prediction['bboxes']) == len(prediction['scores']) == len(prediction['labels']) > 0
    assert set(prediction['labels']) <= {0, 1}
    boxes = np.array(prediction['bboxes'])
    assert (boxes[:, 2:] <= [WIDTH + 1e-3, HEIGHT + 1e-3]).all() and (boxes[:, :2] >= -1e-3).all()
    assert len(prediction['masks']) == len(prediction['bboxes'])
    assert (tmp_path / 'out' / 'vis' / 'photo.png').is_file() and (tmp_path / 'out' / 'preds' / 'photo.json').is_file()

    key = 'backbone.patch_embed.projection.weight'
    torch.save({'state_dict': dict(state, **{key: state[key][:, :, :2, :2]})}, tmp_path / 'misfit.pth')
    with pytest.raises(CheckpointMismatchError, match='shape mismatches: patch_embed.projection.weight'):
        DetInferencer(model=config, weights=str(tmp_path / 'misfit.pth'), device='cpu')


@pytest.mark.slow
def test_mmseg_inferencer_on_a_dynamic_swin_upernet(tmp_path, image):
    from mmseg.apis import MMSegInferencer
    text = segmentation_config('swin', make_ade(tmp_path / 'ade', num_images=2), tmp_path / 'work')
    config, weights, _ = config_and_weights(tmp_path, text)
    inferencer = MMSegInferencer(model=config, weights=str(weights), device='cpu')
    result = inferencer(image, out_dir=str(tmp_path / 'out'))
    assert result['predictions'].shape == (HEIGHT, WIDTH)  # the label map at the input's size
    assert result['predictions'].min() >= 0
    assert (tmp_path / 'out' / 'vis' / 'photo.png').is_file()


@pytest.mark.slow
def test_image_classification_inferencer_on_a_dynamic_vit(tmp_path, image):
    from mmpretrain.apis import ImageClassificationInferencer
    text = tiny_classifier_config(make_imagenet_folder(tmp_path / 'data', per_class=2), tmp_path / 'work')
    config, weights, _ = config_and_weights(tmp_path, text)
    inferencer = ImageClassificationInferencer(model=config, pretrained=str(weights), device='cpu')
    prediction, = inferencer(image)
    assert prediction['pred_label'] in (0, 1) and prediction['pred_scores'].shape == (2, )
    assert prediction['pred_scores'].sum() == pytest.approx(1.0, abs=1e-5)
    # the inferencer's model holds the file's weights, as init_model's does
    model = init_model(config, str(weights))
    assert all(torch.equal(value, model.state_dict()[name]) for name, value in inferencer.model.state_dict().items())
    # a checkpoint without the head is refused, not run with a random head
    torch.save({'state_dict': {k: v for k, v in model.state_dict().items() if not k.startswith('head.')}},
               tmp_path / 'headless.pth')
    with pytest.raises(CheckpointMismatchError, match=r'missing keys: head\.layers\.head\.weight'):
        ImageClassificationInferencer(model=config, pretrained=str(tmp_path / 'headless.pth'), device='cpu')
