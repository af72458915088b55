"""Grad-CAM explanations: heat maps of the malignant score, overlays, and `predict --cam`."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from skincancer.data import load_image
from skincancer.explain import MalignantTarget, malignant_heatmap, overlay, photo_heatmap, target_layer
from skincancer.predict import load_model

pytestmark = pytest.mark.slow


def test_malignant_target_is_the_malignant_logit_or_their_logsumexp():
    logits = torch.tensor([[2.0, -1.0, 0.5]])
    assert MalignantTarget([0])(logits[0]).item() == pytest.approx(2.0)
    assert MalignantTarget([0, 2])(logits[0]).item() == pytest.approx(float(np.log(np.exp(2.0) + np.exp(0.5))))


def test_target_layer_is_the_last_feature_map():
    lite0 = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=3)
    assert target_layer(lite0) is lite0.bn2
    inception = timm.create_model("inception_v3", pretrained=False, num_classes=3)
    assert target_layer(inception) is inception.Mixed_7c
    plain = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 5, 3))
    assert target_layer(plain) is plain[2]


def test_heatmap_and_overlay_of_a_real_image(tiny_run, data_dir):
    classifier = load_model(tiny_run, engine="torch")
    image = load_image(sorted((data_dir / "test" / "melanoma").glob("*.jpg"))[0])
    heatmap = malignant_heatmap(classifier, image)
    assert heatmap.shape == (224, 224) and heatmap.dtype == np.float32
    assert 0.0 <= heatmap.min() and heatmap.max() <= 1.0 and heatmap.std() > 0.01  # a map, not a constant
    picture = overlay(image.resize((600, 300)), heatmap)
    assert picture.mode == "RGB" and picture.size == (512, 256)  # photo's aspect kept, capped at 512 px
    assert all(not m._forward_hooks for m in classifier.model.modules())  # Grad-CAM hooks released


def test_predict_cam_writes_one_overlay_per_readable_image(cli, tiny_run, data_dir, tmp_path):
    images = [sorted((data_dir / "test" / d).glob("*.jpg"))[0] for d in ("melanoma", "nevus")]
    same_name = tmp_path / "other" / images[0].name  # a second file with the same name in another folder
    same_name.parent.mkdir()
    same_name.write_bytes(images[0].read_bytes())
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 definitely not the rest of a JPEG")
    clash = tmp_path / f"{images[0].stem}_2.jpg"  # the name the numbering would give the second copy
    clash.write_bytes(images[1].read_bytes())
    cam_dir = tmp_path / "cams"
    result = cli("predict", *map(str, [*images, same_name, broken, clash]), "--model",
                 str(tiny_run), "--engine", "torch", "--cam", str(cam_dir),
                 "-o", str(tmp_path / "p.csv"))
    assert result.returncode == 1, result.output  # one unreadable file: named, not fatal, but not success
    assert "broken.jpg" in result.output
    written = sorted(p.name for p in cam_dir.iterdir())
    assert written == sorted([f"{images[0].stem}_0_cam.png", f"{images[1].stem}_cam.png",
                              f"{images[0].stem}_3_cam.png", f"{images[0].stem}_2_cam.png"])  # none overwritten
    assert "wrote 4 Grad-CAM overlay(s)" in result.output
    assert f"{same_name} -> {cam_dir / (images[0].stem + '_3_cam.png')}" in result.output
    assert all(p.stat().st_mode & 0o044 for p in cam_dir.iterdir())  # readable by others, as the umask allows
    for png in cam_dir.iterdir():
        with Image.open(png) as picture:
            assert picture.format == "PNG" and picture.size == (256, 256) and picture.mode == "RGB"
    original = np.asarray(load_image(images[1]), dtype=float)
    assert np.abs(np.asarray(Image.open(cam_dir / f"{images[1].stem}_cam.png"), dtype=float) - original).mean() > 5


def test_overlay_keeps_small_photos_at_their_size():
    heatmap = np.linspace(0, 1, 224 * 224, dtype=np.float32).reshape(224, 224)
    picture = overlay(Image.new("RGB", (100, 80), (200, 150, 120)), heatmap)
    assert picture.size == (100, 80)
    pixels = np.asarray(picture, dtype=int)
    assert pixels[0, 0, 2] > pixels[0, 0, 0] and pixels[-1, -1, 0] > pixels[-1, -1, 2]  # cold blue, hot red


def test_an_ensembles_heatmap_is_the_mean_of_its_members(tiny_run, finetune_run, data_dir):
    """Before, `predict --cam` with several --model explained the first model only."""
    from skincancer.ensemble import load_models

    image = load_image(sorted((data_dir / "test" / "melanoma").glob("*.jpg"))[0])
    members = [load_model(run, engine="torch") for run in (tiny_run, finetune_run)]
    maps = [malignant_heatmap(member, image) for member in members]
    assert [m.shape for m in maps] == [(224, 224), (96, 96)]  # each member on its own input grid
    combined = photo_heatmap(load_models([tiny_run, finetune_run], engine="torch"), image, (224, 224))
    assert combined.shape == (224, 224) and combined.dtype == np.float32
    small = np.asarray(Image.fromarray(maps[1], mode="F").resize((224, 224), Image.BILINEAR)).clip(0, 1)
    np.testing.assert_allclose(combined, (maps[0] + small) / 2, atol=1e-6)
    assert np.abs(combined - maps[0]).mean() > 1e-3  # not the first member's map
    with pytest.raises(TypeError, match="for an ensemble use photo_heatmap"):  # not the first member's map either
        malignant_heatmap(load_models([tiny_run, finetune_run], engine="torch"), image)


def test_a_cropping_models_map_covers_the_centre_square_it_saw(tiny_run, data_dir):
    """A model that crops (`resize: crop`) saw only a wide photo's centre square: its map lies there, nothing is
    drawn on the bands it never saw, and the square holds the map of that square itself."""
    from skincancer.images import centre_square

    classifier = load_model(tiny_run, engine="torch")
    classifier.meta["resize"] = "crop"  # the same weights, cropping (as a run trained with --resize crop records)
    square = load_image(sorted((data_dir / "test" / "melanoma").glob("*.jpg"))[0]).resize((200, 200))
    wide = Image.new("RGB", (300, 200), (20, 200, 40))
    wide.paste(square, (50, 0))
    placed = photo_heatmap(classifier, wide, (300, 200))
    assert placed.shape == (200, 300)
    assert not placed[:, :50].any() and not placed[:, 250:].any()
    np.testing.assert_allclose(placed[:, 50:250], photo_heatmap(classifier, centre_square(wide), (200, 200)),
                               atol=1e-6)
    assert placed[:, 50:250].std() > 0.01


@pytest.fixture(scope="module")
def multiscale_run(small_data, cache_dir, tmp_path_factory):
    """A linear probe on pooled stages 3-7 + head (the demo's `pooling: multiscale`)."""
    from skincancer import load_config, train

    out = tmp_path_factory.mktemp("runs") / "multiscale"
    return train(load_config(None, train=str(small_data["train"]), valid=str(small_data["valid"]), out=str(out),
                             mode="linear", pooling="multiscale", cache_dir=str(cache_dir), linear_c=[0.1],
                             num_workers=0, linear_fit="train", class_balance="weighted_loss"))


def test_a_multiscale_models_heatmap_covers_every_pooled_stage(multiscale_run, data_dir):
    """Found by review: the demo's model pools stages 3-7 and its head, but Grad-CAM looked at the head's map only.
    A head that reads the stages alone gave the old method a blank map; one that reads the head's map alone must
    give what Grad-CAM on that map gives."""
    from pytorch_grad_cam import GradCAM

    classifier = load_model(multiscale_run, engine="torch")
    image = load_image(sorted((data_dir / "test" / "melanoma").glob("*.jpg"))[1])
    head = classifier.model.classifier
    last = classifier.model.backbone.num_features  # the head's own map's features come last
    original = head.weight.detach().clone()
    try:
        with torch.no_grad():
            head.weight[:, -last:] = 0  # the stages alone
        stages_only = malignant_heatmap(classifier, image)
        assert stages_only.shape == (224, 224) and stages_only.std() > 0.01
        with torch.no_grad():
            head.weight.copy_(original)
            head.weight[:, :-last] = 0  # the head's map alone: plain Grad-CAM on bn2
        head_only = malignant_heatmap(classifier, image)
        x = classifier.transform()(image).unsqueeze(0)
        with GradCAM(model=classifier.model, target_layers=[classifier.model.bn2]) as cam:
            reference = cam(input_tensor=x, targets=[MalignantTarget(classifier.positive_indices)])[0]
        assert np.corrcoef(head_only.ravel(), reference.ravel())[0, 1] > 0.98
        with torch.no_grad():
            head.weight.copy_(original)
        both = malignant_heatmap(classifier, image)
        assert np.corrcoef(both.ravel(), head_only.ravel())[0, 1] < 0.99  # the stages change the picture
    finally:
        with torch.no_grad():
            head.weight.copy_(original)
