"""`partial-fc unpack` / `unpack_glint360k.py`: face sets to id_<label>/<label>_<n>.jpg, merged, resumed, checked."""

import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

import partial_fc.data.unpack_to_folder as unpack_module
from partial_fc.data.faceset import FaceSetWriter
from partial_fc.data.recordio import IndexedRecordWriter, IRHeader, pack
from partial_fc.data.synthetic import render_identity_image
from partial_fc.data.unpack_to_folder import STATE_NAME, numbers_from_labels, unpack_sets
from tests.cli_helpers import assert_one_error, call
from tests.launchers import REPO


def jpeg(identity: int, index: int) -> bytes:
    """A small generated face as JPEG bytes."""
    return cv2.imencode(".jpg", render_identity_image(1, identity, index, 24)[:, :, ::-1])[1].tobytes()


def face_set(directory, counts: list[int], first_identity: int = 0) -> dict:
    """A set in insightface's layout with `counts[label]` images per label; returns {(label, n): bytes}."""
    images = {}
    with FaceSetWriter(directory, (24, 24)) as writer:
        for label, count in enumerate(counts):
            for n in range(count):
                images[label, n] = jpeg(first_identity + label, n)
                writer.write(label, images[label, n])
    return images


def glint_like_set(directory, labels: list[int]) -> dict:
    """insightface's layout written by hand as Glint360K has it: image records carry an array label [class, 7]."""
    os.makedirs(directory, exist_ok=True)
    images, ranges = {}, []
    with IndexedRecordWriter(directory / "train.rec", directory / "train.idx") as writer:
        for key, label in enumerate(labels, start=1):
            n = sum(1 for other in labels[: key - 1] if other == label)
            images[label, n] = jpeg(label, n)
            writer.write(key, pack(IRHeader(2, [float(label), 7.0], key, 0), images[label, n]))
            if n == 0:
                ranges.append([key, key])
            ranges[-1][1] = key + 1
        first = len(labels) + 1
        for offset, (start, end) in enumerate(ranges):
            writer.write(first + offset, pack(IRHeader(2, [float(start), float(end)], 0, 0), b""))
        writer.write(0, pack(IRHeader(2, [float(first), float(first + len(ranges))], 0, 0), b""))
    return images


def headerless_set(directory, labels: list[int]) -> dict:
    """Image records only (keys 0..N-1, as MXNet's im2rec writes them), with array labels in any order."""
    os.makedirs(directory, exist_ok=True)
    images = {}
    with IndexedRecordWriter(directory / "train.rec", directory / "train.idx") as writer:
        for key, label in enumerate(labels):
            n = sum(1 for other in labels[:key] if other == label)
            images[label, n] = jpeg(label, 10 + n)
            writer.write(key, pack(IRHeader(2, [float(label), 7.0], key, 0), images[label, n]))
    return images


def unpacked(output) -> dict:
    """{(label, n): bytes} of the images under OUT (not `.part` files), checking each sits in its identity's folder."""
    found = {}
    for folder in sorted(os.listdir(output)):
        if folder.startswith("id_"):
            for name in os.listdir(output / folder):
                if name.endswith(".part"):
                    continue
                label, n = (int(part) for part in name.removesuffix(".jpg").split("_"))
                assert folder == f"id_{label}"
                found[label, n] = (output / folder / name).read_bytes()
    return found


def test_script_merges_sets_offsetting_labels_by_the_classes_before(tmp_path):
    first = face_set(tmp_path / "a", [2, 1, 3])
    second = glint_like_set(tmp_path / "b", [0, 0, 1, 1, 1])
    job = subprocess.run(
        [
            sys.executable,
            "unpack_glint360k.py",
            "--include",
            f"{tmp_path / 'a'},{tmp_path / 'b'}",
            "--output",
            str(tmp_path / "out"),
            "--workers",
            "2",
            "--chunk-size",
            "2",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert job.returncode == 0, job.stderr
    summary = json.loads(job.stdout)
    assert (summary["images"], summary["identities"], summary["written"], summary["kept"]) == (11, 5, 11, 0)
    assert "unpack: 11/11" in job.stderr  # the progress line, without a terminal
    expected = dict(first) | {(label + 3, n): data for (label, n), data in second.items()}
    assert unpacked(tmp_path / "out") == expected


def test_array_labels_without_identity_records_number_images_per_label(tmp_path, capsys):
    images = headerless_set(tmp_path / "s", [2, 0, 2, 1, 0, 2, 1])
    status, out, _ = call(
        capsys,
        "unpack",
        "--include",
        str(tmp_path / "s"),
        "--output",
        str(tmp_path / "out"),
        "--workers",
        "2",
        "--chunk-size",
        "3",
        "--quiet",
    )
    assert status == 0 and json.loads(out)["identities"] == 3
    assert unpacked(tmp_path / "out") == images


def test_numbers_count_each_label_in_order():
    assert numbers_from_labels(np.array([5, 3, 5, 5, 3, 9])).tolist() == [0, 0, 1, 2, 1, 0]


def test_interrupted_run_resumes_and_ends_with_exact_counts(tmp_path, monkeypatch):
    images = face_set(tmp_path / "s", [3, 4, 2, 5])
    output = tmp_path / "out"
    real_write = unpack_module._write_atomically
    calls = []

    def dies_on_the_sixth_file(target, payload):
        calls.append(target)
        if len(calls) == 6:  # killed halfway through writing a file: its temporary stays behind
            with open(target + ".part", "wb") as file:
                file.write(payload[:10])
            raise KeyboardInterrupt
        real_write(target, payload)

    monkeypatch.setattr(unpack_module, "_write_atomically", dies_on_the_sixth_file)
    with pytest.raises(KeyboardInterrupt):
        unpack_sets([str(tmp_path / "s")], str(output), workers=1, chunk_size=2, progress=False)
    monkeypatch.undo()
    assert len(unpacked(output)) == 5 and any(
        name.endswith(".part") for _, _, names in os.walk(output) for name in names
    )
    state = json.loads((output / STATE_NAME).read_text())
    assert state["done"] == [[0, 1]]  # chunks finished before the interruption were recorded

    summary = unpack_sets([str(tmp_path / "s")], str(output), workers=2, chunk_size=2, progress=False)
    assert (summary["resumed_chunks"], summary["kept"], summary["written"], summary["images"]) == (2, 1, 9, 14)
    assert unpacked(output) == images
    assert not any(name.endswith(".part") for _, _, names in os.walk(output) for name in names)

    # without the state file every file is checked, and complete ones are kept; a damaged one is rewritten
    (output / STATE_NAME).unlink()
    (output / "id_3" / "3_4.jpg").write_bytes(b"short")
    summary = unpack_sets([str(tmp_path / "s")], str(output), workers=2, chunk_size=2, progress=False)
    assert (summary["resumed_chunks"], summary["kept"], summary["written"]) == (0, 13, 1)
    assert unpacked(output) == images


def test_missing_or_extra_images_at_the_end_are_an_error(tmp_path, capsys):
    face_set(tmp_path / "s", [2, 2])
    arguments = ["unpack", "--include", str(tmp_path / "s"), "--output", str(tmp_path / "out"), "--quiet"]
    assert call(capsys, *arguments)[0] == 0
    (tmp_path / "out" / "id_1" / "1_1.jpg").unlink()  # lost after its chunk was recorded as done
    status, _, err = call(capsys, *arguments)
    assert_one_error(status, err, "3 images unpacked for 4 image records")
    assert call(capsys, *arguments, "--chunk-size", "1")[0] == 0  # another chunking ignores the state: rewritten
    (tmp_path / "out" / "id_0" / "0_7.jpg").write_bytes(b"stray")
    status, _, err = call(capsys, *arguments, "--chunk-size", "1")
    assert_one_error(status, err, "5 images unpacked for 4 image records", "numbers them up to 7")


def test_label_past_its_sets_class_count_is_an_error_when_merging(tmp_path, capsys):
    face_set(tmp_path / "a", [1, 1, 1])
    face_set(tmp_path / "b", [1])
    (tmp_path / "a" / "property").write_text("2,24,24\n")
    status, _, err = call(
        capsys,
        "unpack",
        "--include",
        f"{tmp_path / 'a'},{tmp_path / 'b'}",
        "--output",
        str(tmp_path / "out"),
        "--quiet",
    )
    assert_one_error(
        status, err, str(tmp_path / "a" / "train.rec"), "key 3", "label 2 is not below the set's 2 classes"
    )


def truncate(path, count: int) -> None:
    """Cut the last `count` bytes off a file."""
    data = path.read_bytes()
    path.write_bytes(data[:-count])


@pytest.mark.parametrize("workers", ["1", "2"])
def test_bad_sets_are_named_in_one_line(tmp_path, capsys, workers):
    face_set(tmp_path / "no_idx", [1])
    (tmp_path / "no_idx" / "train.idx").unlink()
    face_set(tmp_path / "cut", [2, 1])
    truncate(tmp_path / "cut" / "train.rec", 6)  # the header (key 0) is written last: it is cut short
    headerless_set(tmp_path / "cut_images", [0, 1, 0, 1])
    truncate(tmp_path / "cut_images" / "train.rec", 6)  # the last image record (key 3) is cut short
    cases = [
        ("no_idx", [str(tmp_path / "no_idx" / "train.idx"), "missing"]),
        ("nowhere", [str(tmp_path / "nowhere"), "no such set folder"]),
        ("cut", [str(tmp_path / "cut" / "train.rec"), "key 0", "truncated"]),
        ("cut_images", [str(tmp_path / "cut_images" / "train.rec"), "key 3", "truncated"]),
    ]
    for folder, names in cases:
        status, _, err = call(
            capsys,
            "unpack",
            "--include",
            str(tmp_path / folder),
            "--output",
            str(tmp_path / "out"),
            "--workers",
            workers,
            "--chunk-size",
            "1",
            "--quiet",
        )
        assert_one_error(status, err, *names)


def test_real_command_fails_in_one_line_without_traceback(tmp_path):
    face_set(tmp_path / "s", [1])
    (tmp_path / "s" / "train.idx").unlink()
    job = subprocess.run(
        [
            sys.executable,
            "-m",
            "partial_fc",
            "unpack",
            "--include",
            str(tmp_path / "s"),
            "--output",
            str(tmp_path / "out"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert job.returncode == 2 and job.stderr.count("partial-fc: error:") == 1 and "Traceback" not in job.stderr
    assert f"{tmp_path / 's' / 'train.idx'}: missing" in job.stderr
