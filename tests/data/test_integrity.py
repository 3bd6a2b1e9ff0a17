"""`partial-fc check-data` and its module on real face sets corrupted on disk: every bad record listed, with reasons."""

import json
import shutil
import struct

import pytest

from partial_fc.data.integrity import check_data
from tests.cli_helpers import assert_one_error, call
from tests.faces import face_jpeg, write_faceset

SIZE, IDENTITIES, PER_IDENTITY = 24, 4, 4  # images are keys 1..16, identity records 17..20, the header key 0


@pytest.fixture(scope="module")
def clean_set(tmp_path_factory):
    return write_faceset(tmp_path_factory.mktemp("clean"), IDENTITIES, PER_IDENTITY, SIZE)


def offsets_of(root) -> dict[int, int]:
    return {
        int(key): int(offset)
        for key, offset in (line.split("\t") for line in (root / "train.idx").read_text().splitlines())
    }


def overwrite(root, key: int, at: int, data: bytes) -> None:
    """Write ``data`` over the bytes at ``at`` within record ``key`` (0: its magic number; 8: its IfQQ header)."""
    with open(root / "train.rec", "r+b") as f:
        f.seek(offsets_of(root)[key] + at)
        f.write(data)


def corrupt_copy(clean_set, tmp_path):
    """The clean set with four records broken on disk, and the reason each should be listed with."""
    root = tmp_path / "set"
    shutil.copytree(clean_set, root)
    overwrite(root, 3, 8 + 24, b"\x00garbage, not a JPEG" * 4)  # the image bytes after the header
    overwrite(root, 6, 0, bytes(4))  # a zeroed magic number
    overwrite(root, 9, 8 + 4, struct.pack("<f", 99.0))  # the scalar label
    overwrite(root, 12, 8 + 4, struct.pack("<f", 1.5))
    return root, {
        3: "cannot decode image",
        6: "not at a record start: bad magic number 0x00000000",
        9: "label 99 is outside [0, num_classes=4)",
        12: "label 1.5 is not a class id",
    }


def test_clean_set_passes(clean_set, capsys):
    status, out, err = call(capsys, "check-data", "--rec", str(clean_set), "--workers", "2", "--quiet")
    summary = json.loads(out.splitlines()[-1])
    assert status == 0 and "bad record" not in out, out + err
    assert summary["records"] == IDENTITIES * PER_IDENTITY + IDENTITIES + 1 and summary["bad"] == 0
    by_file = check_data(clean_set / "train.rec")  # a .rec named directly, its .idx beside it
    assert by_file.records == summary["records"] and by_file.bad == []


@pytest.mark.parametrize("workers", [1, 3])
def test_every_corrupted_record_is_listed_with_file_key_offset_and_reason(clean_set, tmp_path, capsys, workers):
    root, reasons = corrupt_copy(clean_set, tmp_path)
    status, out, _ = call(capsys, "check-data", "--rec", str(root), "--workers", str(workers), "--quiet")
    lines = [line for line in out.splitlines() if line.startswith("bad record: ")]
    offsets, rec = offsets_of(root), root / "train.rec"
    assert status == 1 and len(lines) == len(reasons), out
    for line, (key, reason) in zip(lines, reasons.items()):
        assert line.startswith(f"bad record: {rec}, key {key}, offset {offsets[key]}: {reason}"), line
    assert json.loads(out.splitlines()[-1])["bad"] == len(reasons)


def test_truncated_file_lists_the_cut_record_and_every_one_past_the_end(clean_set, tmp_path):
    root = tmp_path / "set"
    shutil.copytree(clean_set, root)
    offsets = offsets_of(root)
    with open(root / "train.rec", "r+b") as f:
        f.truncate(offsets[10] + 40)
    report = check_data(root, workers=2)
    assert [record.key for record in report.bad] == [0, *range(10, 21)]  # the header first: it names the images
    assert report.bad[1].reason.startswith("truncated file: payload cut short")
    size = (root / "train.rec").stat().st_size
    assert all(
        record.reason == f"offset is past the end of the file ({size} bytes)"
        for record in report.bad
        if record.key != 10
    )


def test_image_folder_lists_the_broken_files(tmp_path, capsys):
    for identity in range(2):
        (tmp_path / f"id{identity}").mkdir()
        for index in range(3):
            (tmp_path / f"id{identity}" / f"{index}.jpg").write_bytes(face_jpeg(identity, index, SIZE))
    (tmp_path / "id1" / "2.jpg").write_bytes(b"\xff\xd8 cut")
    status, out, _ = call(capsys, "check-data", "--rec", str(tmp_path), "--workers", "1", "--quiet")
    assert status == 1 and out.splitlines()[0].startswith(f"bad record: {tmp_path / 'id1' / '2.jpg'}: cannot decode")
    assert json.loads(out.splitlines()[-1])["records"] == 6


def test_missing_set_and_bad_arguments_exit_2(tmp_path, capsys):
    status, _, err = call(capsys, "check-data", "--rec", str(tmp_path / "nowhere"), "--quiet")
    assert_one_error(status, err, str(tmp_path / "nowhere"))
    status, _, err = call(capsys, "check-data", "--rec", str(tmp_path), "--workers", "0")
    assert_one_error(status, err, "--workers 0")
    with pytest.raises(SystemExit) as exited:
        call(capsys, "check-data")
    assert exited.value.code == 2
