"""The one image-folder scan: a folder `partial-fc im2rec` packs is the folder `ImageFolderDataset` trains on."""

import json

import cv2
import numpy as np

from partial_fc.data.datasets import ImageFolderDataset, RecordFaceDataset
from partial_fc.data.decode import decode_rgb
from partial_fc.data.imagefolder import IMAGE_EXTENSIONS
from partial_fc.data.synthetic import render_identity_image
from tests.cli_helpers import call

SIZE = 24


def write_image(path, identity: int, index: int) -> None:
    """A generated face encoded by the file's extension (any case)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, encoded = cv2.imencode(path.suffix.lower(), render_identity_image(2, identity, index, SIZE)[:, :, ::-1])
    assert ok
    path.write_bytes(encoded.tobytes())


def test_a_folder_with_every_extension_packs_and_trains_with_the_same_images_and_labels(tmp_path, capsys):
    assert ".bmp" in IMAGE_EXTENSIONS
    root = tmp_path / "faces"
    names = ["carol", "alice", "bob"]
    for identity, name in enumerate(names):
        for index, ext in enumerate([*IMAGE_EXTENSIONS, ".BMP", ".JPG"]):
            write_image(root / name / f"{index}{ext}", identity, index)
    (root / "alice" / "notes.txt").write_text("not an image")
    write_image(root / ".thumbnails" / "0.jpg", 9, 0)  # a hidden folder is no identity, for either
    images_per_identity = len(IMAGE_EXTENSIONS) + 2

    prefix = str(tmp_path / "set" / "train")
    status, out, err = call(capsys, "im2rec", "--list", "--no-shuffle", prefix, str(root))
    assert status == 0, err
    assert json.loads(out)["images"] == 3 * images_per_identity and json.loads(out)["identities"] == 3
    status, out, err = call(capsys, "im2rec", prefix, str(root), "--pass-through", "--quiet")
    assert status == 0, err

    folder = ImageFolderDataset(root, image_size=None, flip=False)
    packed = RecordFaceDataset(tmp_path / "set", image_size=(SIZE, SIZE), flip=False)
    assert folder.classes == sorted(names) and folder.num_classes == packed.num_classes == 3
    assert len(folder) == len(packed) == 3 * images_per_identity
    assert np.array_equal(folder.labels(), packed.labels())
    listed = [line.split("\t") for line in (tmp_path / "set" / "train.lst").read_text().splitlines()]
    assert [folder.path(i).relative_to(root).as_posix() for i in range(len(folder))] == [path for _, _, path in listed]
    assert folder.labels().tolist() == [int(float(label)) for _, label, _ in listed]
    for i in range(len(folder)):
        (image, label), (stored, stored_label) = folder[i], packed[i]
        assert label.item() == stored_label.item()
        assert np.array_equal(image.numpy(), stored.numpy()), folder.path(i)
        assert np.array_equal(image.numpy(), decode_rgb(folder.path(i).read_bytes()))
    bmp = [i for i in range(len(folder)) if folder.path(i).suffix.lower() == ".bmp"]
    assert len(bmp) == 2 * 3
    for i in bmp:  # BMP is lossless: the rendered face itself
        identity = names.index(folder.classes[folder.labels()[i]])
        expected = render_identity_image(2, identity, int(folder.path(i).stem), SIZE)
        assert np.array_equal(folder[i][0].numpy(), expected)
