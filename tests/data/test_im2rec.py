"""`partial-fc im2rec`: folder -> MXNet `.lst` -> insightface face set, and every bad input named in one line."""

import json
import os
import random
import subprocess
import sys
from collections import defaultdict

import cv2
import numpy as np
import pytest

from partial_fc.data.faceset import read_faceset_index, record_label
from partial_fc.data.im2rec import EncodeOptions, pack_list
from partial_fc.data.recordio import IndexedRecordReader, unpack
from partial_fc.data.synthetic import render_identity_image
from tests.cli_helpers import assert_one_error, call
from tests.launchers import REPO


def encoded(identity: int, index: int, size: int = 32, ext: str = ".jpg", shape: tuple | None = None) -> bytes:
    """A small generated face, encoded; `shape` (height, width) resizes it."""
    image = render_identity_image(0, identity, index, size)[:, :, ::-1]
    if shape is not None:
        image = cv2.resize(image, (shape[1], shape[0]))
    return cv2.imencode(ext, image)[1].tobytes()


def make_folder(root, counts: dict, **kwargs) -> dict:
    """One sub-folder per identity with `counts[name]` images; returns {relative path: bytes}."""
    files = {}
    for identity, (name, count) in enumerate(counts.items()):
        os.makedirs(root / name, exist_ok=True)
        for index in range(count):
            relative = f"{name}/{index:02d}.jpg"
            files[relative] = encoded(identity, index, **kwargs)
            (root / relative).write_bytes(files[relative])
    return files


def payload_of(prefix: str, key: int) -> bytes:
    """The image bytes stored under `key` in PREFIX.rec."""
    with IndexedRecordReader(f"{prefix}.rec", f"{prefix}.idx") as reader:
        return unpack(reader.read(key))[1]


def cli(*arguments: str) -> subprocess.CompletedProcess:
    """The real command in a fresh process."""
    return subprocess.run(
        [sys.executable, "-m", "partial_fc", *arguments], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def test_list_is_mxnet_format_and_order(tmp_path, capsys):
    root = tmp_path / "faces"
    make_folder(root, {"zed": 2, "amy": 3, "bob": 1})
    (root / "amy" / "notes.txt").write_text("not an image")
    (root / "bob" / "UPPER.JPG").write_bytes(encoded(9, 0))
    status, out, _ = call(capsys, "im2rec", "--list", "--no-shuffle", str(tmp_path / "sorted"), str(root))
    assert status == 0 and json.loads(out)["images"] == 7 and json.loads(out)["identities"] == 3
    expected = [
        "0\t0.000000\tamy/00.jpg\n",
        "1\t0.000000\tamy/01.jpg\n",
        "2\t0.000000\tamy/02.jpg\n",
        "3\t1.000000\tbob/00.jpg\n",
        "4\t1.000000\tbob/UPPER.JPG\n",
        "5\t2.000000\tzed/00.jpg\n",
        "6\t2.000000\tzed/01.jpg\n",
    ]
    assert (tmp_path / "sorted.lst").read_text() == "".join(expected)
    # the default shuffle is MXNet's: random.seed(100) then random.shuffle of the listed lines
    assert call(capsys, "im2rec", "--list", str(tmp_path / "shuffled"), str(root))[0] == 0
    random.seed(100)
    random.shuffle(expected)
    assert (tmp_path / "shuffled.lst").read_text() == "".join(expected)


def test_recursive_takes_nested_folders_into_the_identity(tmp_path, capsys):
    root = tmp_path / "faces"
    make_folder(root, {"a": 1, "b": 1})
    os.makedirs(root / "a" / "more")
    (root / "a" / "more" / "x.png").write_bytes(encoded(0, 5, ext=".png"))
    assert call(capsys, "im2rec", "--list", "--no-shuffle", str(tmp_path / "flat"), str(root))[0] == 0
    assert "more" not in (tmp_path / "flat.lst").read_text()
    assert call(capsys, "im2rec", "--list", "--no-shuffle", "--recursive", str(tmp_path / "deep"), str(root))[0] == 0
    assert (tmp_path / "deep.lst").read_text().splitlines()[1] == "1\t0.000000\ta/more/x.png"


def test_folder_to_face_set_pass_through_keeps_bytes_grouped_by_identity(tmp_path):
    root = tmp_path / "faces"
    files = make_folder(root, {"p": 3, "q": 1, "r": 4, "s": 2})
    prefix = str(tmp_path / "set" / "train")
    listed = cli("im2rec", "--list", prefix, str(root))
    packed = cli("im2rec", prefix, str(root), "--pass-through", "--num-thread", "2")
    assert listed.returncode == 0 and packed.returncode == 0, listed.stderr + packed.stderr
    summary = json.loads(packed.stdout)
    assert (summary["images"], summary["identities"], summary["image_size"]) == (10, 4, [32, 32])
    assert "im2rec: 10/10" in packed.stderr  # the progress line, without a terminal
    assert (tmp_path / "set" / "property").read_text() == "4,32,32\n"
    per_label = defaultdict(list)  # each identity's images in .lst order: the order the set must keep
    for line in (tmp_path / "set" / "train.lst").read_text().splitlines():
        _, label, path = line.split("\t")
        per_label[int(float(label))].append(files[path])
    with IndexedRecordReader(f"{prefix}.rec", f"{prefix}.idx") as reader:
        index = read_faceset_index(reader)
        assert index.identity_ranges.tolist() == [[1, 4], [4, 5], [5, 9], [9, 11]]
        for label, (start, end) in enumerate(index.identity_ranges.tolist()):
            stored = [unpack(reader.read(key)) for key in range(start, end)]
            assert [record_label(header, path="", key=0) for header, _ in stored] == [label] * (end - start)
            assert [payload for _, payload in stored] == per_label[label]
    assert sorted(os.listdir(tmp_path / "set")) == ["property", "train.idx", "train.lst", "train.rec"]


def test_resize_center_crop_png_and_thread_count_do_not_change_the_records(tmp_path, capsys):
    root = tmp_path / "faces"
    make_folder(root, {"a": 3, "b": 2}, shape=(40, 30))
    prefix = str(tmp_path / "t")
    assert call(capsys, "im2rec", "--list", prefix, str(root))[0] == 0
    pack_list(prefix, str(root), EncodeOptions(resize=24), num_thread=1, progress=False)
    image = cv2.imdecode(np.frombuffer(payload_of(prefix, 1), np.uint8), cv2.IMREAD_COLOR)
    assert image.shape == (32, 24, 3)  # shorter side 24, longer 40 * 24 // 30, as MXNet computes it
    first = (tmp_path / "t.rec").read_bytes()
    pack_list(prefix, str(root), EncodeOptions(resize=24), num_thread=3, progress=False)
    assert (tmp_path / "t.rec").read_bytes() == first
    status, out, _ = call(
        capsys, "im2rec", prefix, str(root), "--center-crop", "--resize", "16", "--encoding", ".png", "--quiet"
    )
    assert status == 0 and json.loads(out)["image_size"] == [16, 16]
    payload = payload_of(prefix, 5)
    assert payload.startswith(b"\x89PNG") and cv2.imdecode(np.frombuffer(payload, np.uint8), 1).shape == (16, 16, 3)


@pytest.mark.parametrize(
    "layout, message",
    [
        ({}, "no identity folders"),
        ({"a": 1, "empty": 0}, "identity folder holds no images"),
    ],
)
def test_bad_folders_are_named(tmp_path, capsys, layout, message):
    root = tmp_path / "faces"
    root.mkdir()
    make_folder(root, layout)
    status, _, err = call(capsys, "im2rec", "--list", str(tmp_path / "x"), str(root))
    assert_one_error(status, err, message, str(root / "empty") if "empty" in layout else str(root))
    assert not (tmp_path / "x.lst").exists()


def test_images_directly_in_root_are_refused(tmp_path, capsys):
    make_folder(tmp_path / "faces", {"a": 1})
    (tmp_path / "faces" / "loose.jpg").write_bytes(encoded(0, 0))
    status, _, err = call(capsys, "im2rec", "--list", str(tmp_path / "x"), str(tmp_path / "faces"))
    assert_one_error(status, err, "holds images directly", "loose.jpg")


@pytest.mark.parametrize(
    "line, message",
    [
        ("1\t0.000000\n", "expected 3 tab-separated fields"),
        ("1\t0.000000\ta/00.jpg\textra\n", "expected 3 tab-separated fields"),
        ("1\t1.5\ta/00.jpg\n", "label 1.5"),
        ("1\t-2.000000\ta/00.jpg\n", "label -2.000000"),
        ("one\t0.000000\ta/00.jpg\n", "is not a number"),
        ("1\t0.000000\ta/missing.jpg\n", "cannot read the image"),
        ("1\t0.000000\ta/broken.jpg\n", "cannot decode the image"),
        ("1\t0.000000\ta/empty.jpg\n", "cannot decode the image"),
    ],
)
def test_bad_lst_lines_name_the_file_and_line(tmp_path, capsys, line, message):
    root = tmp_path / "faces"
    make_folder(root, {"a": 1})
    (root / "a" / "broken.jpg").write_bytes(b"\xff\xd8 this is not a JPEG")
    (root / "a" / "empty.jpg").write_bytes(b"")
    lst = tmp_path / "bad.lst"
    lst.write_text("0\t0.000000\ta/00.jpg\n\n" + line)  # the blank line still counts: the bad line is line 3
    status, _, err = call(capsys, "im2rec", str(tmp_path / "bad"), str(root), "--num-thread", "2")
    assert_one_error(status, err, f"{lst}, line 3", message)
    if "image" in message:
        assert str(root / line.split("\t")[2].strip()) in err
    assert sorted(os.listdir(tmp_path)) == ["bad.lst", "faces"]  # no set, no temporary files left


def test_real_command_reports_a_missing_list_and_bad_options_without_traceback(tmp_path):
    (tmp_path / "faces").mkdir()
    missing = cli("im2rec", str(tmp_path / "nothing"), str(tmp_path / "faces"))
    assert missing.returncode == 2 and missing.stderr.count("partial-fc: error:") == 1
    assert f"{tmp_path / 'nothing'}.lst: no such .lst file" in missing.stderr and "Traceback" not in missing.stderr


@pytest.mark.parametrize(
    "options, message",
    [
        (["--quality", "0"], "--quality 0 is outside 1-100"),
        (["--encoding", ".png", "--quality", "10"], "--quality 10 is outside 0-9"),
        (["--pass-through", "--resize", "8"], "--pass-through stores files unchanged"),
        (["--num-thread", "0"], "--num-thread 0"),
    ],
)
def test_bad_options(tmp_path, capsys, options, message):
    make_folder(tmp_path / "faces", {"a": 1})
    assert call(capsys, "im2rec", "--list", str(tmp_path / "x"), str(tmp_path / "faces"))[0] == 0
    status, _, err = call(capsys, "im2rec", str(tmp_path / "x"), str(tmp_path / "faces"), *options)
    assert_one_error(status, err, message)
