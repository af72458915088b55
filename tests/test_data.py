import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from skincancer.config import DEFAULT_LABELS, ISIC2017_LABELS
from skincancer.data import (
    DataError,
    check_image,
    index_folder,
    load_image,
    load_manifest,
    save_manifest,
)
from skincancer.datasets import ImageDataset, build_transform, collate
from skincancer.sources import index_isic_csv


def make_tree(data_dir: Path, root: Path, per_class: int = 2) -> Path:
    """A small folder-per-class copy of real ISIC images (in a temporary folder, never in the repo)."""
    for diagnosis in ISIC2017_LABELS:
        (root / diagnosis).mkdir(parents=True)
        for src in sorted((data_dir / "train" / diagnosis).glob("*.jpg"))[:per_class]:
            shutil.copy(src, root / diagnosis / src.name)
    return root


def test_index_imports_no_torch(data_dir, tmp_path):
    """`skincancer index` in a fresh process loads no torch, torchvision or scikit-learn (seconds a start), and writes
    its manifest."""
    tree, out = make_tree(data_dir, tmp_path / "tree"), tmp_path / "manifest.csv"
    script = f"""
import sys
from skincancer.cli import main
sys.argv = ["skincancer", "index", {str(tree)!r}, "-o", {str(out)!r}]
try:
    main()
except SystemExit as exit:
    assert not exit.code, exit.code
print([m for m in ("torch", "torchvision", "timm", "sklearn") if m in sys.modules])
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"
    assert len(load_manifest(out)) == 6


def test_index_folder_labels_and_diagnoses(data_dir, tmp_path):
    manifest = index_folder(make_tree(data_dir, tmp_path / "tree"), DEFAULT_LABELS)
    assert len(manifest) == 6
    assert list(manifest.columns) == ["image_id", "filepath", "diagnosis", "label"]
    assert (manifest.loc[manifest.diagnosis == "melanoma", "label"] == 1).all()
    assert (manifest.loc[manifest.diagnosis != "melanoma", "label"] == 0).all()


def test_custom_label_map(data_dir, tmp_path):
    labels = {"melanoma": 1, "seborrheic_keratosis": 1, "nevus": 0}
    manifest = index_folder(make_tree(data_dir, tmp_path / "tree"), labels)
    assert manifest.groupby("diagnosis")["label"].first().to_dict() == labels


def test_unknown_class_folder_is_named(data_dir, tmp_path):
    root = make_tree(data_dir, tmp_path / "tree")
    (root / "bowen").mkdir()  # not in the vocabulary (docs/data.md), so not in the default label map
    with pytest.raises(DataError, match="bowen"):
        index_folder(root, DEFAULT_LABELS)


def test_manifest_round_trip_uses_relative_paths(data_dir, tmp_path):
    manifest = index_folder(make_tree(data_dir, tmp_path / "tree"), DEFAULT_LABELS)
    path = save_manifest(manifest, tmp_path / "sub" / "manifest.csv")
    raw = pd.read_csv(path)
    assert not any(Path(p).is_absolute() for p in raw["filepath"])
    back = load_manifest(path)
    assert list(back["filepath"]) == list(manifest["filepath"])
    assert all(Path(p).is_file() for p in back["filepath"])


def test_index_isic_csv_matches_folders(data_dir):
    manifest = index_isic_csv(data_dir / "ISIC-2017_Validation_Part3_GroundTruth.csv", data_dir / "valid",
                              DEFAULT_LABELS)
    assert len(manifest) == 150
    # the folder an image sits in is its diagnosis
    assert all(Path(p).parent.name == d for p, d in zip(manifest.filepath, manifest.diagnosis, strict=True))
    assert manifest.label.sum() == 30


def test_isic_csv_without_expected_columns(tmp_path, data_dir):
    bad = tmp_path / "gt.csv"
    bad.write_text("image,mel\nISIC_0000000,1\n")
    with pytest.raises(DataError, match=r"gt\.csv.*missing column\(s\) image_id, melanoma, seborrheic_keratosis"):
        index_isic_csv(bad, data_dir / "valid", DEFAULT_LABELS)


def test_manifest_without_label_column(tmp_path):
    bad = tmp_path / "m.csv"
    bad.write_text("filepath,diagnosis\na.jpg,nevus\n")
    with pytest.raises(DataError, match=r"m\.csv.*label"):
        load_manifest(bad)


@pytest.fixture
def bad_files(tmp_path, data_dir) -> dict[str, Path]:
    real = sorted((data_dir / "train" / "nevus").glob("*.jpg"))[0]
    files = {"zero": tmp_path / "zero.jpg", "text": tmp_path / "text.jpg", "truncated": tmp_path / "truncated.jpg",
             "missing": tmp_path / "missing.jpg"}
    files["zero"].write_bytes(b"")
    files["text"].write_text("this is not an image\n")
    files["truncated"].write_bytes(real.read_bytes()[: real.stat().st_size // 2])
    return files


@pytest.mark.parametrize(("name", "reason"), [("zero", "empty file"), ("text", "not an image"),
                                              ("truncated", "truncated"), ("missing", "not found")])
def test_bad_files_have_clear_reasons(bad_files, name, reason):
    assert reason in check_image(bad_files[name])


def test_odd_but_valid_images_become_rgb(tmp_path):
    rgba = tmp_path / "alpha.png"
    Image.new("RGBA", (40, 30), (255, 0, 0, 128)).save(rgba)
    gray16 = tmp_path / "gray16.png"
    Image.fromarray(np.full((30, 40), 40000, dtype=np.uint16)).save(gray16)
    cmyk = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (40, 30), (0, 255, 255, 0)).save(cmyk)
    for path in (rgba, gray16, cmyk):
        image = load_image(path)
        assert image.mode == "RGB" and image.size == (40, 30), path
    assert 150 < np.asarray(load_image(gray16))[0, 0, 0] < 160  # 40000/65535 of white


def test_a_large_16_bit_image_converts_without_a_float_copy():
    """A 16-bit upload of 200 kB can be 9400 x 9400 px: a float64 copy of it costs 0.7 GB per temporary."""
    import tracemalloc

    from skincancer.data import to_rgb

    values = np.random.default_rng(0).integers(0, 65536, (2000, 1500), dtype=np.uint16)
    image = Image.fromarray(values)
    tracemalloc.start()
    try:
        converted = to_rgb(image)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2.5 * values.nbytes, f"{peak / 1e6:.0f} MB for a {values.nbytes / 1e6:.0f} MB image"
    expected = np.clip(values / 65535 * 255 + 0.5, 0, 255).astype(np.uint8)  # the rounding of before
    assert np.array_equal(np.asarray(converted)[..., 0], expected)


def test_exif_rotation_is_applied(tmp_path):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    Image.new("RGB", (60, 20)).save(path, exif=exif)
    assert load_image(path).size == (20, 60)


def test_tiny_image_is_refused(tmp_path):
    path = tmp_path / "one.png"
    Image.new("RGB", (1, 1)).save(path)
    assert "too small" in check_image(path)


def test_dataset_reports_bad_files_without_raising(bad_files, data_dir):
    real = str(sorted((data_dir / "train" / "nevus").glob("*.jpg"))[0])
    dataset = ImageDataset([real, str(bad_files["text"]), real], [0, 0, 0], build_transform(64, [0.5] * 3, [0.5] * 3))
    batch = collate([dataset[i] for i in range(3)])
    assert batch["image"].shape == (2, 3, 64, 64)
    assert batch["index"].tolist() == [0, 2]
    assert batch["errors"][0][0] == 1 and "not an image" in batch["errors"][0][1]


def test_every_format_a_single_file_opens_is_found_in_a_folder(tmp_path):
    """`predict DIR` and `index DIR` must not skip formats that `predict FILE` reads (.gif was skipped)."""
    from skincancer.images import expand_inputs

    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8))
    for suffix in ("jpg", "png", "gif", "bmp", "tiff", "webp"):
        image.save(tmp_path / f"a.{suffix}")
    (tmp_path / "notes.txt").write_text("not an image")
    found = [Path(p).name for p in expand_inputs([tmp_path])]
    assert sorted(found) == sorted(f"a.{s}" for s in ("jpg", "png", "gif", "bmp", "tiff", "webp"))
    for path in found:
        assert load_image(tmp_path / path).mode == "RGB"


def test_class_folder_nested_in_another_class_is_refused(data_dir, tmp_path):
    """melanoma/nevus/x.jpg was silently labelled melanoma: a benign folder misplaced inside a malignant one."""
    root = make_tree(data_dir, tmp_path / "tree")
    nested = root / "melanoma" / "batch1" / " Nevus "
    nested.mkdir(parents=True)
    shutil.copy(next((root / "nevus").glob("*.jpg")), nested / "x.jpg")
    with pytest.raises(DataError, match="misplaced class folder") as raised:
        index_folder(root, DEFAULT_LABELS)
    assert str(nested) in str(raised.value)


def test_nested_folder_without_a_class_name_keeps_the_parent_label(data_dir, tmp_path):
    root = make_tree(data_dir, tmp_path / "tree")
    (root / "melanoma" / "batch1").mkdir()
    (root / "melanoma" / "Melanoma").mkdir()  # the same class nested, as some archives unpack: labels stay right
    shutil.copy(next((root / "nevus").glob("*.jpg")), root / "melanoma" / "batch1" / "x.jpg")
    shutil.copy(next((root / "nevus").glob("*.jpg")), root / "melanoma" / "Melanoma" / "y.jpg")
    manifest = index_folder(root, DEFAULT_LABELS)
    for stem in ("x", "y"):
        row = manifest.loc[manifest.image_id == stem].iloc[0]
        assert (row.diagnosis, row.label) == ("melanoma", 1)
    assert len(manifest) == 8


def test_unknown_class_folder_name_is_quoted(data_dir, tmp_path):
    root = make_tree(data_dir, tmp_path / "tree")
    (root / "nevus").rename(root / "nevus ")
    with pytest.raises(DataError, match=r"class folder\(s\) 'nevus ' not in the label map"):
        index_folder(root, DEFAULT_LABELS)


def test_preview_takes_labels_for_a_tree_with_its_own_classes(cli, data_dir, tmp_path):
    """preview's error told users to pass --labels, which preview did not have."""

    root = make_tree(data_dir, tmp_path / "tree")
    (root / "seborrheic_keratosis").rename(root / "bcc")
    result = cli("preview", str(root), "-o", str(tmp_path / "a.png"))
    assert result.returncode == 2 and "error: " in result.stderr, result.output  # the DataError, as main() prints it
    assert "--labels" in result.stderr.split("error: ", 1)[1]
    result = cli("preview", str(root), "-o", str(tmp_path / "b.png"),
                 "--labels", "melanoma=1,bcc=1,nevus=0")
    assert result.returncode == 0, result.output
    with Image.open(tmp_path / "b.png") as grid:
        assert grid.format == "PNG" and grid.width > 100


def test_manifest_ids_stay_as_written_and_odd_labels_are_refused(data_dir, tmp_path):
    image, other = sorted((Path(data_dir) / "train" / "nevus").glob("*.jpg"))[:2]
    path = tmp_path / "m.csv"
    pd.DataFrame({"image_id": ["001", "1"], "filepath": [str(image), str(other)], "diagnosis": ["nevus", "nevus"],
                  "label": [0, 0]}).to_csv(path, index=False)
    assert list(load_manifest(path)["image_id"]) == ["001", "1"]  # not 1 and 1, "appearing twice"
    pd.DataFrame({"filepath": [str(image), str(other)], "label": ["True", "False"]}).to_csv(path, index=False)
    with pytest.raises(DataError, match="column label must hold 0 or 1, found True"):
        load_manifest(path)
    pd.DataFrame({"filepath": [str(image)], "diagnosis": [""], "label": [0]}).to_csv(path, index=False)
    with pytest.raises(DataError, match="row 2: column diagnosis is empty"):
        load_manifest(path)


def test_floating_point_images_are_scaled_as_arrays_are_or_refused(tmp_path):
    grey = np.linspace(0, 1, 40 * 30, dtype=np.float32).reshape(30, 40)
    path = tmp_path / "float.tif"
    Image.fromarray(grey, mode="F").save(path)
    pixels = np.asarray(load_image(path))[..., 0]
    assert pixels.min() == 0 and pixels.max() == 255  # 0..1 is the whole range, not near-black
    Image.fromarray(grey * 1000, mode="F").save(path)
    assert "floating-point image with values 0 to 1000" in check_image(path)


def test_a_nul_in_a_manifest_path_is_named(data_dir, tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("filepath,label\nplain\x00.jpg,0\n")
    with pytest.raises(DataError, match="row 2: column filepath holds a NUL character"):
        load_manifest(path)


@pytest.mark.parametrize("augment", ["standard", "strong", "perez"])
def test_training_augmentations_give_the_size_asked_and_vary(data_dir, augment):
    """Each training augmentation set makes a tensor of the training size from a real image, different each draw."""
    image = load_image(sorted((data_dir / "train" / "melanoma").glob("*.jpg"))[0])
    transform = build_transform(96, [0.5] * 3, [0.5] * 3, augment)
    torch.manual_seed(0)
    first, second = transform(image), transform(image)
    assert first.shape == second.shape == (3, 96, 96)
    assert not torch.equal(first, second)


@pytest.mark.parametrize("resize", ["squash", "crop"])
def test_numpy_preprocessing_matches_the_torch_transform(data_dir, resize):
    """ONNX prediction preprocesses in numpy (no torch): the same arrays as the torch transforms, image for image,
    with either resize policy."""
    from skincancer.images import EvalTransform, ImageList, collate_arrays

    paths = [str(p) for d in ("melanoma", "nevus") for p in sorted((data_dir / "valid" / d).glob("*.jpg"))[:2]]
    odd = Image.fromarray(np.random.default_rng(0).integers(0, 256, (37, 301, 3), dtype=np.uint8))  # not square
    for size, mean, std in ((224, [0.5] * 3, [0.5] * 3), (97, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])):
        arrays, tensors = EvalTransform(size, mean, std, resize), build_transform(size, mean, std, "none", resize)
        for image in [*map(load_image, paths), odd]:
            got, expected = arrays(image), tensors(image).numpy()
            assert got.dtype == np.float32 and got.shape == expected.shape == (3, size, size)
            np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
        batch = collate_arrays([ImageList([*paths, "missing.jpg"], None, arrays)[i] for i in range(len(paths) + 1)])
        reference = collate([ImageDataset([*paths, "missing.jpg"], None, tensors)[i] for i in range(len(paths) + 1)])
        np.testing.assert_allclose(batch["image"], reference["image"].numpy(), rtol=0, atol=1e-6)
        assert batch["index"].tolist() == reference["index"].tolist() and batch["errors"] == reference["errors"]


@pytest.mark.parametrize("resize", ["squash", "crop"])
def test_augmented_views_are_fixed_and_the_same_in_numpy_and_torch(data_dir, resize):
    """Test-time draws beyond the first 8 views: each a fixed augmentation (the same on every call and for every
    image), different from the plain image and from each other, equal through the numpy and torch preprocessing."""
    from skincancer.images import AugmentedView, EvalTransform, centre_square

    image = load_image(sorted((data_dir / "valid" / "melanoma").glob("*.jpg"))[0]).resize((300, 200))
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    plain = EvalTransform(96, mean, std, resize)(image)
    views = []
    for draw in range(1, 8):
        array = AugmentedView(EvalTransform(96, mean, std), draw, resize)(image)
        tensor = AugmentedView(build_transform(96, mean, std), draw, resize)(image).numpy()
        np.testing.assert_allclose(array, tensor, rtol=0, atol=1e-6)
        np.testing.assert_array_equal(array, AugmentedView(EvalTransform(96, mean, std), draw, resize)(image))
        assert array.shape == plain.shape and np.abs(array - plain).mean() > 0.05
        views.append(array)
    assert min(np.abs(a - b).mean() for i, a in enumerate(views) for b in views[i + 1:]) > 0.05
    if resize == "crop":  # the augmentation starts from the centre square: a copy of it gives the same view
        square = centre_square(image)
        np.testing.assert_array_equal(AugmentedView(EvalTransform(96, mean, std), 3, resize)(square),
                                      AugmentedView(EvalTransform(96, mean, std), 3, resize)(image))


def test_the_crop_policy_keeps_the_centre_square_and_the_squash_policy_the_whole_image():
    """A 200 x 150 frame (HAM10000's shape) whose 25-px side bands are red: `crop` sees only the grey centre square,
    in evaluation and in every training augmentation; `squash` keeps the bands. A square image is the same either
    way."""
    pixels = np.full((150, 200, 3), 128, dtype=np.uint8)
    pixels[:, :25] = pixels[:, -25:] = (255, 0, 0)
    frame = Image.fromarray(pixels)
    cropped = build_transform(64, [0.0] * 3, [1.0] * 3, "none", "crop")(frame).numpy()
    assert np.allclose(cropped, 128 / 255, atol=1e-6)
    squashed = build_transform(64, [0.0] * 3, [1.0] * 3, "none", "squash")(frame).numpy()
    assert squashed[0, :, 0].min() > 0.9  # red at the left edge
    def red(tensor):
        return bool((tensor[0] > tensor[1] + 0.5).any())

    for augment in ("standard", "strong", "perez"):
        drawn = {}
        for resize in ("crop", "squash"):
            torch.manual_seed(0)
            transform = build_transform(64, [0.0] * 3, [1.0] * 3, augment, resize)
            drawn[resize] = [red(transform(frame).numpy()) for _ in range(8)]
        assert not any(drawn["crop"]), augment  # the bands were cut before augmenting
        assert any(drawn["squash"]), augment  # and would have shown
    square = Image.fromarray(pixels[:, 25:-25])
    np.testing.assert_array_equal(build_transform(64, [0.0] * 3, [1.0] * 3, "none", "crop")(square).numpy(),
                                  build_transform(64, [0.0] * 3, [1.0] * 3, "none", "squash")(square).numpy())


def test_one_uint8_rule_for_arrays_and_float_images():
    """images.to_uint8 owns the rule (data's float TIFFs and predict's arrays call it): rounding as before, in blocks
    of rows, so a large float or 16-bit upload is never copied whole as float64."""
    import tracemalloc

    from skincancer.images import PixelRangeError, to_uint8

    rng = np.random.default_rng(0)
    for values, expected in (
        (np.array([[0.0, 0.5, 1.0]], np.float32), [[0, 128, 255]]),
        (np.array([[0.0, 127.4, 255.0]], np.float64), [[0, 127, 255]]),
        (np.array([[0, 128, 255]], np.int32), [[0, 128, 255]]),
        (np.array([[0, 32896, 65535]], np.uint16), [[0, 128, 255]]),
        (np.array([[0, 7, 255]], np.uint8), [[0, 7, 255]]),
    ):
        got = to_uint8(values)
        assert got.dtype == np.uint8 and got.tolist() == expected, values.dtype
    for bad, finite in ((np.array([[0.0, np.nan]]), False), (np.array([[-3.0, 2.0]]), True),
                        (np.array([[0, 300]], np.int16), True)):
        with pytest.raises(PixelRangeError) as caught:
            to_uint8(bad)
        assert caught.value.finite == finite
    for values in (rng.random((2000, 1500, 3), dtype=np.float32), rng.integers(0, 65536, (2000, 1500, 3), np.uint16)):
        tracemalloc.start()
        try:
            converted = to_uint8(values)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        extra = peak - converted.nbytes  # beyond the 8-bit result; a whole float copy would be 2-4x values.nbytes
        assert extra < 0.5 * values.nbytes, f"{extra / 1e6:.0f} MB for {values.nbytes / 1e6:.0f} MB of {values.dtype}"
        scale = 255 if values.dtype == np.float32 else 255 / 65535
        assert np.array_equal(converted, np.clip(values * scale + 0.5, 0, 255).astype(np.uint8))
