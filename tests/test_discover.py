"""File discovery on the three layouts, class order, natural file order, labels files."""

from __future__ import annotations

from pathlib import Path

import pytest

from batchuq.discover import (
    LayoutError,
    NoImagesFoundError,
    UsageError,
    discover_images,
    natural_key,
    order_classes,
    read_labels_file,
)


def touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")


def test_class_folders_in_keras_order_files_in_natural_order(tmp_path: Path) -> None:
    """Class folders are numbered as ``sorted()`` (Keras's loader); files walk naturally."""
    for name in ["n10/a.jpg", "n2/b.PNG", "n2/a10.jpeg", "n2/a9.jpg", "n0/deep/x.bmp", "n1/z.GIF"]:
        touch(tmp_path / name)
    touch(tmp_path / "n1" / "notes.txt")
    touch(tmp_path / "n1" / ".hidden.jpg")
    touch(tmp_path / ".cache" / "c.jpg")
    found = discover_images(tmp_path)
    assert found.class_folders == ["n0", "n1", "n10", "n2"]
    assert [f.relative_path for f in found.files] == [
        "n0/deep/x.bmp",
        "n1/z.GIF",
        "n2/a9.jpg",
        "n2/a10.jpeg",
        "n2/b.PNG",
        "n10/a.jpg",
    ]
    assert [f.folder_label for f in found.files] == ["n0", "n1", "n2", "n2", "n2", "n10"]
    assert found.labelled


def test_flat_folder_is_unlabelled(tmp_path: Path) -> None:
    for name in ["img2.jpg", "img10.jpg", "img1.png"]:
        touch(tmp_path / name)
    found = discover_images(tmp_path)
    assert [f.relative_path for f in found.files] == ["img1.png", "img2.jpg", "img10.jpg"]
    assert found.class_folders == [] and not found.labelled
    assert all(f.folder_label is None for f in found.files)


def test_any_class_names_and_mixed_layout(tmp_path: Path) -> None:
    touch(tmp_path / "cats" / "1.jpg")
    touch(tmp_path / "Dogs" / "1.jpg")
    touch(tmp_path / "loose.jpg")
    found = discover_images(tmp_path)
    assert found.class_folders == ["Dogs", "cats"]  # sorted(): upper case first, as Keras
    assert {f.relative_path: f.folder_label for f in found.files} == {
        "cats/1.jpg": "cats",
        "Dogs/1.jpg": "Dogs",
        "loose.jpg": None,
    }


def test_order_does_not_depend_on_creation_order(tmp_path: Path) -> None:
    names = [f"n{i % 3}/img{i}.jpg" for i in range(30)]
    expected = sorted(names, key=lambda n: (natural_key(n.split("/")[0]), natural_key(n)))
    for folder, order in (("a", names), ("b", names[::-1]), ("c", names[1::2] + names[::2])):
        for name in order:  # the file system may list files in creation order
            touch(tmp_path / folder / name)
        found = discover_images(tmp_path / folder)
        assert [f.relative_path for f in found.files] == expected


def test_zero_images_is_a_loud_error_naming_folder_and_extensions(tmp_path: Path) -> None:
    touch(tmp_path / "readme.txt")
    with pytest.raises(NoImagesFoundError) as info:
        discover_images(tmp_path)
    assert str(tmp_path) in str(info.value) and ".jpg" in str(info.value)
    with pytest.raises(NotADirectoryError, match="Received: images="):
        discover_images(tmp_path / "missing")


def test_natural_key() -> None:
    assert sorted(["n10", "n2", "n1"], key=natural_key) == ["n1", "n2", "n10"]


def test_order_classes_keras_is_sorted_natural_by_number() -> None:
    names = ["class_2", "class_10", "class_1", "class_12"]
    assert order_classes(names) == sorted(names) == ["class_1", "class_10", "class_12", "class_2"]
    assert order_classes(names, "natural") == ["class_1", "class_2", "class_10", "class_12"]
    with pytest.raises(UsageError, match="Received: class_order='alpha'"):
        order_classes(names, "alpha")


def test_monkey_labels_file(tmp_path: Path) -> None:
    labels = tmp_path / "monkey_labels.txt"
    labels.write_text(
        "Label,  Latin Name           , Common Name                   , Train Images , "
        "Validation Images\n"
        "n0   , alouatta_palliata\t, mantled_howler                , 131          , 26\n"
        "n1   , erythrocebus_patas\t, patas_monkey                  , 139          , 28\n"
    )
    assert read_labels_file(labels) == {"n0": "mantled_howler", "n1": "patas_monkey"}
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="header"):
        read_labels_file(tmp_path / "empty.txt")


def test_image_dataset_from_directory_layout_is_class_folders(tmp_path: Path) -> None:
    # The layout keras.utils.image_dataset_from_directory reads: main_directory/class_x/*.jpg.
    for name in ["class_a/a_image_1.jpg", "class_a/a_image_2.jpg", "class_b/b_image_1.jpg"]:
        touch(tmp_path / "main_directory" / name)
    found = discover_images(tmp_path / "main_directory")
    assert found.class_folders == ["class_a", "class_b"] and found.notices == []
    assert [f.folder_label for f in found.files] == ["class_a", "class_a", "class_b"]


def test_kaggle_nested_archive_is_descended_into_with_a_notice(tmp_path: Path) -> None:
    # 10-monkey-species unpacks as training/training/n0..n9 and validation/validation/n0..n9.
    for split in ("training", "validation"):
        for c in range(10):
            touch(tmp_path / split / split / f"n{c}" / f"n{c}18.jpg")
    (tmp_path / "monkey_labels.txt").write_text("Label, Latin Name, Common Name\n")
    found = discover_images(tmp_path / "training")
    assert found.root == str(tmp_path / "training" / "training")
    assert found.class_folders == [f"n{c}" for c in range(10)]
    assert found.files[0].relative_path == "n0/n018.jpg"
    assert len(found.notices) == 1 and "holds only the folder 'training'" in found.notices[0]


def test_folder_of_dataset_splits_is_refused_naming_the_splits(tmp_path: Path) -> None:
    for split in ("training", "validation"):
        for c in range(3):
            touch(tmp_path / split / split / f"n{c}" / "x.jpg")
    with pytest.raises(LayoutError, match="dataset splits") as info:
        discover_images(tmp_path)
    assert str(tmp_path / "training") in str(info.value)
    assert str(tmp_path / "validation") in str(info.value)
    # The same with flat splits of class folders (train/cat, test/cat ...).
    flat = tmp_path / "flat"
    for split in ("train", "val", "test"):
        touch(flat / split / "cat" / "1.png")
    with pytest.raises(LayoutError, match="'train'|train"):
        discover_images(flat)


def test_classes_named_like_splits_but_flat_are_classes(tmp_path: Path) -> None:
    # A "test" folder of images (no class folders inside) is an ordinary class folder.
    touch(tmp_path / "test" / "1.jpg")
    touch(tmp_path / "other" / "2.jpg")
    assert discover_images(tmp_path).class_folders == ["other", "test"]


def test_imagenet_style_synset_folders(tmp_path: Path) -> None:
    synsets = ["n01440764", "n01443537", "n02102040"]
    for i, synset in enumerate(synsets):
        touch(tmp_path / synset / f"{synset}_{i}.JPEG")
    found = discover_images(tmp_path)
    assert found.class_folders == synsets and len(found.files) == 3


def test_single_class_folder_is_not_descended_into(tmp_path: Path) -> None:
    touch(tmp_path / "n0" / "a.jpg")
    found = discover_images(tmp_path)
    assert found.class_folders == ["n0"] and found.notices == []


def test_files_with_other_extensions_are_counted_or_included(tmp_path: Path) -> None:
    for name in ["a.webp", "b.TIF", "c.tiff", "d.jfif", "e.ppm", "f.pgm", "g.ico", "h.png"]:
        touch(tmp_path / name)
    touch(tmp_path / "notes.txt")
    touch(tmp_path / "raw.cr2")
    found = discover_images(tmp_path)
    assert len(found.files) == 8 and found.skipped == ["notes.txt", "raw.cr2"]
    everything = discover_images(tmp_path, extensions=None)
    assert len(everything.files) == 10 and everything.skipped == []
