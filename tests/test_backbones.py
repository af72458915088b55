"""The bundled EfficientNet-Lite weights are mapped correctly: known photos get their ImageNet class."""

import pytest
import timm
import torch
from PIL import Image

from skincancer.backbones import (
    BackboneError,
    build_model,
    bundled_weights_path,
    load_imagenet_weights,
    map_lukemelas_state_dict,
    preprocessing,
)
from skincancer.datasets import build_transform

skimage_data = pytest.importorskip("skimage.data")

# ImageNet indices: 281-285 domestic cats (285 Egyptian cat); 967 espresso, 968 cup.
PHOTOS = {"chelsea": set(range(281, 286)), "coffee": {967, 968}}


@pytest.mark.parametrize("backbone", ["tf_efficientnet_lite0", "tf_efficientnet_lite2"])
def test_imagenet_mapping_classifies_known_photos(backbone):
    model = timm.create_model(backbone, num_classes=1000)
    load_imagenet_weights(model, backbone)
    model.eval()
    transform = build_transform(224, [0.5] * 3, [0.5] * 3)
    for photo, classes in PHOTOS.items():
        x = transform(Image.fromarray(getattr(skimage_data, photo)()).convert("RGB"))[None]
        with torch.no_grad():
            probs = model(x).softmax(1)[0]
        top = int(probs.argmax())
        assert top in classes, f"{backbone} called {photo} class {top}"
        assert probs[sorted(classes)].sum() > 0.5


def test_random_weights_do_not_classify():
    # the same check fails without the mapping: it is not a test that always passes
    model = timm.create_model("tf_efficientnet_lite0", num_classes=1000).eval()
    x = build_transform(224, [0.5] * 3, [0.5] * 3)(Image.fromarray(skimage_data.chelsea()).convert("RGB"))[None]
    with torch.no_grad():
        assert model(x).softmax(1)[0, 281:286].sum() < 0.5


def test_mapping_refuses_mismatched_shapes():
    source = torch.load(bundled_weights_path("tf_efficientnet_lite0"), map_location="cpu", weights_only=True)
    with pytest.raises(BackboneError, match="does not fit"):  # same tensor count, other widths
        map_lukemelas_state_dict(source, timm.create_model("tf_efficientnet_lite0", num_classes=10))
    source.popitem()
    with pytest.raises(BackboneError, match="295 tensors"):
        map_lukemelas_state_dict(source, timm.create_model("tf_efficientnet_lite0"))


def test_build_model_new_head_and_unknown_backbone():
    model = build_model("tf_efficientnet_lite0", num_classes=3)
    assert model.get_classifier().out_features == 3
    with pytest.raises(BackboneError, match="unknown backbone"):
        build_model("no_such_net", 3)


def test_multiscale_pooling_concatenates_stages_and_round_trips(tmp_path):
    from skincancer.backbones import MultiScaleClassifier, model_from_meta
    from skincancer.checkpoint import read_weights, save_model

    model = build_model("tf_efficientnet_lite0", num_classes=3, pooling="multiscale").eval()
    assert isinstance(model, MultiScaleClassifier)
    x = torch.randn(2, 3, 96, 96)
    features = model.forward_features(x)
    assert features.shape == (2, 40 + 80 + 112 + 192 + 320 + 1280)  # stages 3-7 and the 1280-d head
    meta = {"backbone": "tf_efficientnet_lite0", "class_names": ["a", "b", "c"], "labels": {"a": 1, "b": 0, "c": 0},
            "image_size": 96, "mean": [0.5] * 3, "std": [0.5] * 3, "threshold": 0.5, "pooling": "multiscale"}
    save_model(model, meta, tmp_path)
    again = model_from_meta(meta).eval()
    again.load_state_dict(read_weights(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x))
    with pytest.raises(BackboneError, match="pooling"):
        build_model("tf_efficientnet_lite0", 3, pooling="max")


def test_multiscale_last_features_are_the_plain_models():
    # Same ImageNet weights, untouched BatchNorm statistics: the head's pooled features must be identical.
    plain = build_model("tf_efficientnet_lite0", num_classes=3).eval()
    wrapped = build_model("tf_efficientnet_lite0", num_classes=3, pooling="multiscale").eval()
    assert preprocessing(wrapped) == preprocessing(plain) == {"mean": [0.5] * 3, "std": [0.5] * 3}
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        expected = plain.forward_head(plain.forward_features(x), pre_logits=True)
        torch.testing.assert_close(wrapped.forward_features(x)[:, -1280:], expected)


@pytest.mark.parametrize("backbone", ["efficientnet_b0", "tf_efficientnetv2_b0"])
def test_multiscale_pooling_reads_every_later_stage_of_other_efficientnets(backbone):
    from skincancer.backbones import MultiScaleClassifier

    model = build_model(backbone, num_classes=3, pretrained=False, pooling="multiscale").eval()
    net = model.backbone
    with torch.no_grad():
        maps = model.feature_maps(torch.randn(1, 3, 64, 64))
    assert len(maps) == len(net.blocks) - MultiScaleClassifier.FIRST_STAGE + 1  # later stages, then the head
    assert [m.shape[1] for m in maps[:-1]] == [stage[-1].conv_pwl.out_channels if hasattr(stage[-1], "conv_pwl")
                                               else stage[-1].conv.out_channels
                                               for stage in net.blocks[MultiScaleClassifier.FIRST_STAGE:]]
    assert maps[-1].shape[1] == net.num_features
