"""File discovery on the three layouts, natural order, labels files."""

from __future__ import annotations

from pathlib import Path

import pytest

from batchuq.discover import NoImagesFoundError, discover_images, natural_key, read_labels_file


def touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")


def test_class_folders_are_labelled_in_natural_order(tmp_path: Path) -> None:
    for name in ["n10/a.jpg", "n2/b.PNG", "n2/a10.jpeg", "n2/a9.jpg", "n0/deep/x.bmp", "n1/z.GIF"]:
        touch(tmp_path / name)
    touch(tmp_path / "n1" / "notes.txt")
    touch(tmp_path / "n1" / ".hidden.jpg")
    touch(tmp_path / ".cache" / "c.jpg")
    found = discover_images(tmp_path)
    assert found.class_folders == ["n0", "n1", "n2", "n10"]
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
    assert found.class_folders == ["cats", "Dogs"]
    assert {f.relative_path: f.folder_label for f in found.files} == {
        "cats/1.jpg": "cats",
        "Dogs/1.jpg": "Dogs",
        "loose.jpg": None,
    }


def test_order_is_deterministic(tmp_path: Path) -> None:
    for i in range(30):
        touch(tmp_path / f"n{i % 3}" / f"img{i}.jpg")
    assert discover_images(tmp_path) == discover_images(tmp_path)


def test_zero_images_is_a_loud_error_naming_folder_and_extensions(tmp_path: Path) -> None:
    touch(tmp_path / "readme.txt")
    with pytest.raises(NoImagesFoundError) as info:
        discover_images(tmp_path)
    assert str(tmp_path) in str(info.value) and ".jpg" in str(info.value)
    with pytest.raises(NotADirectoryError, match="Received: images="):
        discover_images(tmp_path / "missing")


def test_natural_key() -> None:
    assert sorted(["n10", "n2", "n1"], key=natural_key) == ["n1", "n2", "n10"]


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
