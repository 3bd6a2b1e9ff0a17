"""insightface's face-set layout: written and read back, header-less sets, array labels, ids past 2**24."""

import numpy as np
import pytest

from partial_fc.data.faceset import (
    EXACT_LIMIT,
    FaceSetWriter,
    read_faceset_index,
    read_property,
    record_label,
)
from partial_fc.data.recordio import IndexedRecordReader, IndexedRecordWriter, IRHeader, RecordIOError, pack, unpack


def open_set(directory, name="train"):
    return IndexedRecordReader(directory / f"{name}.rec", directory / f"{name}.idx")


def labels_of(reader, keys):
    return [record_label(unpack(reader.read(int(key)))[0], path=reader.path, key=int(key)) for key in keys]


def test_written_set_has_insightface_layout(tmp_path):
    with FaceSetWriter(tmp_path, image_size=(112, 96)) as writer:
        for label, count in [(0, 2), (1, 3), (4, 1)]:
            for n in range(count):
                writer.write(label, f"image {label}/{n}".encode())
    reader = open_set(tmp_path)
    header, payload = unpack(reader.read(0))
    assert header.flag == 2 and list(header.label) == [7.0, 10.0] and payload == b""
    index = read_faceset_index(reader)
    assert index.image_keys.tolist() == [1, 2, 3, 4, 5, 6]
    assert index.identity_ranges.tolist() == [[1, 3], [3, 6], [6, 7]]
    assert labels_of(reader, index.image_keys) == [0, 0, 1, 1, 1, 4]
    assert unpack(reader.read(4))[1] == b"image 1/1"
    assert read_property(tmp_path) == (5, 112, 96)


def test_headerless_set_is_read_in_index_order(tmp_path):
    with IndexedRecordWriter(tmp_path / "train.rec", tmp_path / "train.idx") as writer:
        for key, label in [(5, 3), (2, 1), (9, 0)]:
            writer.write(key, pack(IRHeader(0, float(label), key, 0), b"jpeg"))
    reader = open_set(tmp_path)
    index = read_faceset_index(reader)
    assert index.image_keys.tolist() == [5, 2, 9] and index.identity_ranges is None
    assert labels_of(reader, index.image_keys) == [3, 1, 0]


def test_array_labels_give_their_first_value():
    header = IRHeader(2, np.array([17.0, 3.0], np.float32), 1, 0)
    assert record_label(header, path="x.rec", key=1) == 17


def test_class_ids_past_float32_precision_survive(tmp_path):
    large = EXACT_LIMIT + 1  # float32 would store EXACT_LIMIT
    with FaceSetWriter(tmp_path) as writer:
        writer.write(3, b"a")
        writer.write(large, b"b")
    reader = open_set(tmp_path)
    assert labels_of(reader, read_faceset_index(reader).image_keys) == [3, large]


@pytest.mark.parametrize(
    "header, message",
    [
        (IRHeader(0, -2.0, 1, 0), "label -2 is not a class id"),
        (IRHeader(0, 1.5, 1, 0), "label 1.5"),
        (IRHeader(1, np.zeros(0, np.float32), 1, 0), "empty label"),
    ],
)
def test_bad_labels_name_file_and_key(header, message):
    with pytest.raises(RecordIOError, match=message) as error:
        record_label(header, path="sets/train.rec", key=41)
    assert "sets/train.rec" in str(error.value) and "key 41" in str(error.value)


def test_identities_must_be_contiguous(tmp_path):
    writer = FaceSetWriter(tmp_path)
    writer.write(0, b"a")
    writer.write(1, b"b")
    with pytest.raises(RecordIOError, match="label 0 are not contiguous"):
        writer.write(0, b"c")


def test_header_that_disagrees_with_the_index_is_reported(tmp_path):
    with IndexedRecordWriter(tmp_path / "train.rec", tmp_path / "train.idx") as writer:
        writer.write(1, pack(IRHeader(0, 0.0, 1, 0), b"a"))
        writer.write(3, pack(IRHeader(2, [1.0, 2.0], 0, 0), b""))
        writer.write(0, pack(IRHeader(2, [3.0, 4.0], 0, 0), b""))
    with pytest.raises(RecordIOError, match="images are keys 1..2, but the index has 1"):
        read_faceset_index(open_set(tmp_path))


def test_property_file_errors_name_the_file(tmp_path):
    (tmp_path / "property").write_text("many,112,112\n")
    with pytest.raises(RecordIOError, match="property"):
        read_property(tmp_path)


class GlintSizedReader:
    """An index of 2**24 + 2 image keys whose header's float32 label cannot name the boundary exactly."""

    path = idx_path = "glint/train.rec"

    def __init__(self):
        self.images = EXACT_LIMIT + 2
        self.key_array = np.arange(0, self.images + 2, dtype=np.int64)  # header, images, 1 identity record

    def __contains__(self, key):
        return 0 <= key < len(self.key_array)

    def read(self, key):
        boundary = self.images + 1
        if key == 0:  # float32(boundary) rounds to an even number: not the true boundary
            return pack(IRHeader(2, [float(np.float32(boundary)), float(np.float32(boundary + 1))], 0, 0), b"")
        if key == boundary:
            return pack(IRHeader(2, [1.0, 2.0], 0, 0), b"")
        return pack(IRHeader(2, [float(np.float32(key % 1000)), 0.0], key, 0), b"jpeg")


def test_boundary_rounded_by_float32_is_found_from_the_records():
    reader = GlintSizedReader()
    assert int(np.float32(reader.images + 1)) != reader.images + 1
    index = read_faceset_index(reader)
    assert len(index.image_keys) == reader.images and index.image_keys[-1] == reader.images


def test_key_zero_image_with_an_array_label_is_not_a_header(tmp_path):
    with IndexedRecordWriter(tmp_path / "train.rec", tmp_path / "train.idx") as writer:
        for key in range(4):
            writer.write(key, pack(IRHeader(2, [float(key % 2), 9.0], key, 0), b"jpeg"))
    reader = open_set(tmp_path)
    index = read_faceset_index(reader)
    assert index.image_keys.tolist() == [0, 1, 2, 3] and index.identity_ranges is None
    assert labels_of(reader, index.image_keys) == [0, 1, 0, 1]


def test_lost_index_of_a_face_set_is_rebuilt_with_its_keys(tmp_path):
    from partial_fc.data.faceset import rebuild_faceset_index

    with FaceSetWriter(tmp_path) as writer:
        for label in (0, 0, 1, 2):
            writer.write(label, b"jpeg %d" % label)
    original = (tmp_path / "train.idx").read_text()
    (tmp_path / "train.idx").unlink()
    assert rebuild_faceset_index(tmp_path / "train.rec", tmp_path / "train.idx") == 8
    assert (tmp_path / "train.idx").read_text() == original


def test_lost_index_of_a_plain_set_is_sequential(tmp_path):
    from partial_fc.data.faceset import rebuild_faceset_index

    with IndexedRecordWriter(tmp_path / "train.rec", tmp_path / "train.idx") as writer:
        for key in range(3):
            writer.write(key, pack(IRHeader(0, 1.0, key, 0), b"jpeg"))
    original = (tmp_path / "train.idx").read_text()
    rebuild_faceset_index(tmp_path / "train.rec", tmp_path / "train.idx")
    assert (tmp_path / "train.idx").read_text() == original
