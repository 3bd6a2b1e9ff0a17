"""Native MXNet RecordIO: golden files written by real MXNet 1.9.1, round trips, multiprocess readers, bad input.

The golden files under tests/fixtures/mxnet/ were made by make_fixtures.py there; MXNet is not needed here.
"""

import json
import multiprocessing
import pickle
import random
import shutil
import struct

import numpy as np
import pytest

from partial_fc.data import (
    MAGIC,
    IndexedRecordReader,
    IndexedRecordWriter,
    IRHeader,
    RecordIOError,
    RecordReader,
    RecordWriter,
    pack,
    pack_header,
    read_header,
    rebuild_index,
    recordio,
    unpack,
)
from partial_fc.errors import InputError
from tests.launchers import REPO

FIXTURES = REPO / "tests" / "fixtures" / "mxnet"
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())
FILES = MANIFEST["files"]
INDEXED = sorted(name for name, f in FILES.items() if f["indexed"])
MAGIC_BYTES = struct.pack("<I", MAGIC)


def payloads(name):
    return [bytes.fromhex(r["payload"]) for r in FILES[name]["records"]]


def reference_encode(payload: bytes) -> bytes:
    """A second, deliberately naive encoder written from the format description (cross-checks the real one)."""
    cuts = [i for i in range(0, len(payload) - 3, 4) if payload[i : i + 4] == MAGIC_BYTES]
    pieces, start = [], 0
    for i in cuts:
        pieces.append(payload[start:i])
        start = i + 4
    pieces.append(payload[start:])
    flags = [0] if len(pieces) == 1 else [1] + [2] * (len(pieces) - 2) + [3]
    out = b""
    for flag, piece in zip(flags, pieces):
        out += struct.pack("<II", MAGIC, flag << 29 | len(piece)) + piece + b"\0" * (-len(piece) % 4)
    return out


def random_payload(rng: random.Random) -> bytes:
    """Random bytes, often with magic numbers at aligned offsets (0, the end, runs) and unaligned ones."""
    n = rng.choice([0, 1, 2, 3, 4, 5, 7, 8, 12, 13, 31, 64, 257, rng.randrange(0, 600)])
    data = bytearray(rng.getrandbits(8) for _ in range(n))
    for _ in range(rng.choice([0, 0, 1, 2, 5])):
        if n < 4:
            break
        kind = rng.random()
        if kind < 0.15:
            pos = 0
        elif kind < 0.3:
            pos = (n - 4) // 4 * 4  # last aligned slot
        elif kind < 0.8:
            pos = rng.randrange(0, n - 3, 4) if n >= 4 else 0
        else:
            pos = rng.randrange(0, n - 3)  # possibly unaligned
        run = rng.choice([1, 1, 2, 3])
        for r in range(run):
            p = pos + 4 * r
            if p + 4 <= n:
                data[p : p + 4] = MAGIC_BYTES
    return bytes(data)


def copy_fixture(tmp_path, name):
    rec = tmp_path / f"{name}.rec"
    shutil.copyfile(FIXTURES / f"{name}.rec", rec)
    if FILES[name]["indexed"]:
        shutil.copyfile(FIXTURES / f"{name}.idx", tmp_path / f"{name}.idx")
    return rec, tmp_path / f"{name}.idx"


# ----------------------------------------------------------------------------------------------------------------
# golden files: reading


def test_fixtures_were_made_by_mxnet():
    assert MANIFEST["mxnet"] == "1.9.1"
    assert set(FILES) == {"empty", "plain", "magic", "keyed", "images"}
    names = {r["name"] for r in FILES["magic"]["records"]}
    assert {"magic_only", "magic_x2", "magic_x3", "magic_at_0", "magic_at_end", "magic_unaligned_1"} <= names


@pytest.mark.parametrize("name", sorted(FILES))
def test_sequential_read_of_mxnet_file(name):
    reader = RecordReader(FIXTURES / f"{name}.rec")
    assert list(reader) == payloads(name)
    assert [o for o, _ in reader.scan(payloads=False)] == [r["offset"] for r in FILES[name]["records"]]
    for r in FILES[name]["records"]:
        assert reader.read_at(r["offset"]).hex() == r["payload"]


@pytest.mark.parametrize("name", INDEXED)
def test_indexed_read_of_mxnet_file(name):
    records = FILES[name]["records"]
    reader = IndexedRecordReader(FIXTURES / f"{name}.rec", FIXTURES / f"{name}.idx")
    assert reader.keys == [r["key"] for r in records]
    assert len(reader) == len(records)
    for r in reversed(records):  # random order
        assert r["key"] in reader
        assert reader.offset_of(r["key"]) == r["offset"]
        assert reader.read(r["key"]).hex() == r["payload"]
    assert 123456789 not in reader and "x" not in reader
    with pytest.raises(KeyError, match=f"{name}.idx.*key 123456789"):
        reader.read(123456789)


def test_mxnet_split_layout_matches_dmlc_rules():
    """The MXNet file itself shows the splitting rules our writer reproduces (empty first/middle/last parts)."""
    raw = (FIXTURES / "magic.rec").read_bytes()
    by_name = {r["name"]: r for r in FILES["magic"]["records"]}

    def parts(name):
        off, out = by_name[name]["offset"], []
        while True:
            magic, lrec = struct.unpack_from("<II", raw, off)
            assert magic == MAGIC
            out.append((lrec >> 29, lrec & (1 << 29) - 1))
            off += 8 + (out[-1][1] + 3) // 4 * 4
            if out[-1][0] in (0, 3):
                return out

    assert parts("magic_only") == [(1, 0), (3, 0)]
    assert parts("magic_x2") == [(1, 0), (2, 0), (3, 0)]
    assert parts("magic_x3") == [(1, 0), (2, 0), (2, 0), (3, 0)]
    assert parts("magic_at_0") == [(1, 0), (3, 8)]
    assert parts("magic_at_end") == [(1, 8), (3, 0)]
    assert parts("magic_middle_x2") == [(1, 4), (2, 0), (3, 8)]
    assert parts("magic_at_0_tail3") == [(1, 0), (3, 3)]
    assert parts("magic_unaligned_end") == [(0, 7)]
    assert parts("magic_big_endian") == [(0, 12)]


# ----------------------------------------------------------------------------------------------------------------
# golden files: writing byte-for-byte


@pytest.mark.parametrize("name", sorted(FILES))
def test_writer_is_byte_identical_to_mxnet(tmp_path, name):
    records = FILES[name]["records"]
    rec, idx = tmp_path / "out.rec", tmp_path / "out.idx"
    if FILES[name]["indexed"]:
        with IndexedRecordWriter(rec, idx) as w:
            for r in records:
                assert w.write(r["key"], bytes.fromhex(r["payload"])) == r["offset"]
        assert idx.read_bytes() == (FIXTURES / f"{name}.idx").read_bytes()
    else:
        with RecordWriter(rec) as w:
            for r in records:
                assert w.tell() == r["offset"]
                assert w.write(bytes.fromhex(r["payload"])) == r["offset"]
    assert rec.read_bytes() == (FIXTURES / f"{name}.rec").read_bytes()


def test_writer_accepts_bytes_like(tmp_path):
    with RecordWriter(tmp_path / "a.rec") as w:
        w.write(bytearray(b"abc"))
        w.write(memoryview(b"xyz1" + MAGIC_BYTES))
        w.write(np.arange(3, dtype=np.uint8))
    assert list(RecordReader(tmp_path / "a.rec")) == [b"abc", b"xyz1" + MAGIC_BYTES, b"\0\1\2"]


# ----------------------------------------------------------------------------------------------------------------
# image records: pack / unpack


def label_value(kind, value):
    """Mirror of make_fixtures.label_value: rebuild the label object MXNet was given."""
    return {
        "int": int,
        "float": float,
        "bool": bool,
        "np_float32": np.float32,
        "np_int64": np.int64,
        "list": list,
        "tuple": tuple,
        "ndarray_f32": lambda v: np.asarray(v, np.float32),
        "ndarray_f64": lambda v: np.asarray(v, np.float64),
        "ndarray_i64": lambda v: np.asarray(v, np.int64),
        "ndarray_0d": lambda v: np.array(v, np.float64),
    }[kind](value)


def assert_header(header, expected):
    assert (header.flag, header.id, header.id2) == (expected["flag"], expected["id"], expected["id2"])
    if expected["flag"] > 0:
        assert isinstance(header.label, np.ndarray) and header.label.dtype == np.float32
        np.testing.assert_array_equal(header.label, np.asarray(expected["label"], np.float32))
    else:
        assert isinstance(header.label, float) and header.label == expected["label"]


@pytest.mark.parametrize("case", MANIFEST["pack_cases"], ids=lambda c: c["name"])
def test_pack_matches_mxnet(case):
    header = IRHeader(case["flag"], label_value(case["label_kind"], case["label"]), case["id"], case["id2"])
    payload = bytes.fromhex(case["payload"])
    packed = pack(header, payload)
    assert packed.hex() == case["packed"]
    assert pack_header(header) + payload == packed
    assert pack(tuple(header), payload) == packed  # any 4-sequence, as mx.recordio.pack accepts
    got, rest = unpack(packed)
    assert rest == payload
    assert_header(got, case["unpacked"])


@pytest.mark.parametrize("case", MANIFEST["mxnet_rounds_silently"], ids=lambda c: c["name"])
def test_pack_refuses_ids_float32_cannot_hold(case):
    header = IRHeader(case["flag"], label_value(case["label_kind"], case["label"]), case["id"], case["id2"])
    with pytest.raises(RecordIOError, match="16777217.*float32.*16777216"):
        pack(header, bytes.fromhex(case["payload"]))


@pytest.mark.parametrize(
    "label",
    [
        2**24 + 1,
        np.int64(2**31 - 1),
        np.uint64(2**63 + 1),
        float(2**25 + 1),
        [0, 2**40 + 1],
        np.array([5, 2**30 + 3]),
        10**40,
        1e39,
        [1, 2**70 + 1],
        [[3], [2**25 + 1]],
    ],
)
def test_pack_names_the_inexact_label(label):
    with pytest.raises(RecordIOError) as err:
        pack(IRHeader(0, label, 0, 0), b"")
    shown = str(max(np.asarray(label, dtype=object).ravel().tolist()))
    shown = str(int(label)) if isinstance(label, float) else shown
    assert shown in str(err.value)
    assert isinstance(err.value, InputError) and isinstance(err.value, ValueError)


@pytest.mark.parametrize("label", [[1, [2, 3]], ["a"], object()])
def test_pack_rejects_non_numeric_labels(label):
    with pytest.raises(RecordIOError, match="neither a number nor an array of numbers"):
        pack(IRHeader(0, label, 0, 0), b"")


def test_pack_keeps_exact_labels_and_rounds_fractions_like_mxnet():
    assert unpack(pack(IRHeader(0, 2**24, 0, 0), b""))[0].label == 2**24
    assert unpack(pack(IRHeader(0, 2**30, 0, 0), b""))[0].label == 2**30  # exactly representable
    assert unpack(pack(IRHeader(0, 0.1, 0, 0), b""))[0].label == float(np.float32(0.1))
    assert np.isnan(unpack(pack(IRHeader(0, float("nan"), 0, 0), b""))[0].label)


@pytest.mark.parametrize("field,value", [("id", -1), ("id2", 2**64), ("id", 1.5)])
def test_pack_rejects_bad_ids(field, value):
    header = IRHeader(0, 1, 0, 0)._replace(**{field: value})
    with pytest.raises(RecordIOError, match=f"{field}.*{value}"):
        pack(header, b"")


def test_images_fixture_unpacks_like_mxnet():
    records = FILES["images"]["records"]
    reader = IndexedRecordReader(FIXTURES / "images.rec", FIXTURES / "images.idx")
    for r in records:
        header, image = unpack(reader.read(r["key"]))
        assert_header(header, r["header"])
        assert image.hex() == r["image"]
        assert pack(header, image).hex() == r["payload"]  # unpack -> pack is the identity on MXNet records
    # insightface layout: record 0 = [first identity record, end); identity records = [first image, end image)
    h0, _ = unpack(reader.read(0))
    first_id, end = (int(x) for x in h0.label)
    assert (h0.flag, first_id, end) == (2, 7, 10)
    for ident, key in enumerate(range(first_id, end)):
        h, _ = unpack(reader.read(key))
        start, stop = (int(x) for x in h.label)
        assert [unpack(reader.read(k))[0].label for k in range(start, stop)] == [float(ident)] * (stop - start)


def test_read_header_reads_only_the_header(tmp_path):
    rec, idx = tmp_path / "h.rec", tmp_path / "h.idx"
    headers = [IRHeader(0, 3.0, 1, 0), IRHeader(0, 2.0**20, 2, 0), IRHeader(9, np.arange(9, dtype=np.float32), 3, 4)]
    with IndexedRecordWriter(rec, idx) as w:
        for key, header in enumerate(headers):
            w.write(key, pack(header, b"\xff\xd8" + bytes(5000)))
        w.write(len(headers), pack(IRHeader(0, 7.0, 0, 0), MAGIC_BYTES * 3))  # a split record
    reader = IndexedRecordReader(rec, idx)
    for key in reader.keys:
        offset = reader.offset_of(key)
        header, expected = read_header(reader, offset), unpack(reader.read(key))[0]
        assert header[0] == expected[0] and header[2:] == expected[2:]
        np.testing.assert_array_equal(header.label, expected.label)
        assert reader.read_prefix(offset, 10) == reader.read(key)[:10]
    assert reader.read_prefix(reader.offset_of(0), 10**6) == reader.read(0)  # never past the record


def test_unpack_short_records():
    with pytest.raises(RecordIOError, match="10 bytes is shorter than its 24-byte header"):
        unpack(b"\0" * 10)
    short = struct.pack("IfQQ", 3, 0, 0, 0) + b"\0" * 8
    with pytest.raises(RecordIOError, match="too short for its 3 float32 labels"):
        unpack(short)


# ----------------------------------------------------------------------------------------------------------------
# round trips


def test_encoder_matches_reference_on_random_payloads():
    rng = random.Random(1234)
    for _ in range(3000):
        p = random_payload(rng)
        assert recordio._encode(p) == reference_encode(p), p.hex()


def test_random_round_trip(tmp_path):
    rng = random.Random(7)
    data = [random_payload(rng) for _ in range(400)]
    data += [MAGIC_BYTES * 50, MAGIC_BYTES * 50 + b"x", b"\0" * 100_000, bytes(rng.getrandbits(8) for _ in range(5000))]
    keys = rng.sample(range(-1000, 10**9), len(data))
    rec, idx = tmp_path / "r.rec", tmp_path / "r.idx"
    offsets = []
    with IndexedRecordWriter(rec, idx) as w:
        for k, p in zip(keys, data):
            offsets.append(w.write(k, p))
    assert rec.read_bytes() == b"".join(reference_encode(p) for p in data)
    assert idx.read_text() == "".join(f"{k}\t{o}\n" for k, o in zip(keys, offsets))

    reader = IndexedRecordReader(rec, idx)
    assert list(reader) == data
    assert reader.keys == keys
    order = list(range(len(data)))
    rng.shuffle(order)
    for i in order:
        assert reader.read(keys[i]) == data[i]
        assert reader.read_at(offsets[i]) == data[i]
    shuffled_keys = np.array([keys[i] for i in order])
    starts = reader.offsets_of(shuffled_keys)
    assert starts.tolist() == [offsets[i] for i in order]
    ends = reader.record_ends(starts)
    assert [reader.read_span(int(a), int(b)) for a, b in zip(starts, ends)] == [data[i] for i in order]
    with pytest.raises(KeyError, match=f"no record with key {max(keys) + 1}"):
        reader.offsets_of(np.array([keys[0], max(keys) + 1]))


def test_read_span_checks_what_it_cannot_read_in_one_go(tmp_path):
    rec, idx = copy_fixture(tmp_path, "magic")
    reader = IndexedRecordReader(rec, idx)
    starts = reader.offsets_of(reader.key_array)
    ends = reader.record_ends(starts)
    assert ends[-1] == rec.stat().st_size and (ends > starts).all()
    assert [reader.read_span(int(a), int(b)) for a, b in zip(starts, ends)] == [reader.read(k) for k in reader.keys]
    assert reader.read_span(int(starts[1]), int(starts[1]) + 4) == reader.read_at(int(starts[1]))  # span too short
    with pytest.raises(RecordIOError, match="not at a record start"):
        reader.read_span(int(starts[1]) + 4, int(ends[1]))


def test_sequential_keys_use_direct_lookup(tmp_path):
    rec, idx = tmp_path / "s.rec", tmp_path / "s.idx"
    with IndexedRecordWriter(rec, idx) as w:
        for k in range(5, 25):
            w.write(k, str(k).encode())
    reader = IndexedRecordReader(rec, idx)
    assert reader._base == 5
    assert [reader.read(k) for k in range(5, 25)] == [str(k).encode() for k in range(5, 25)]
    assert 4 not in reader and 25 not in reader
    with pytest.raises(KeyError):
        reader.read(25)


# ----------------------------------------------------------------------------------------------------------------
# rebuild_index


@pytest.mark.parametrize("name", ["magic", "images", "empty"])
def test_rebuild_index_reproduces_mxnet_idx(tmp_path, name):
    out = tmp_path / "rebuilt.idx"
    n = rebuild_index(FIXTURES / f"{name}.rec", out)
    assert n == len(FILES[name]["records"])
    assert out.read_bytes() == (FIXTURES / f"{name}.idx").read_bytes()


@pytest.mark.parametrize("name", ["plain", "keyed"])
def test_rebuild_index_numbers_records_in_file_order(tmp_path, name):
    out = tmp_path / "rebuilt.idx"
    rebuild_index(FIXTURES / f"{name}.rec", out)
    expected = [r["offset"] for r in FILES[name]["records"]]
    assert out.read_text() == "".join(f"{i}\t{o}\n" for i, o in enumerate(expected))
    reader = IndexedRecordReader(FIXTURES / f"{name}.rec", out)
    assert [reader.read(i) for i in range(len(reader))] == payloads(name)


def test_rebuild_index_leaves_nothing_on_a_bad_file(tmp_path):
    rec, _ = copy_fixture(tmp_path, "plain")
    rec.write_bytes(rec.read_bytes()[:-3])
    with pytest.raises(RecordIOError, match="truncated"):
        rebuild_index(rec, tmp_path / "new.idx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain.rec"]


# ----------------------------------------------------------------------------------------------------------------
# processes


def _read_keys(reader, keys):
    return [reader.read(k) for k in keys]


_INHERITED = None


def _read_inherited(keys):
    return [_INHERITED.read(k) for k in keys]


def _read_bad(reader):
    try:
        reader.read_at(2)
    except RecordIOError as e:
        return e
    return None


def test_readers_pickle(tmp_path):
    reader = IndexedRecordReader(FIXTURES / "magic.rec", FIXTURES / "magic.idx")
    reader.read(3)  # open a handle first: it must not travel
    clone = pickle.loads(pickle.dumps(reader))
    assert clone._fh is None
    assert [clone.read(k) for k in clone.keys] == payloads("magic")
    plain = pickle.loads(pickle.dumps(RecordReader(FIXTURES / "plain.rec")))
    assert list(plain) == payloads("plain")
    with pytest.raises(TypeError), RecordWriter(tmp_path / "w.rec") as w:
        pickle.dumps(w)


def test_readers_in_forked_workers():
    global _INHERITED
    reader = IndexedRecordReader(FIXTURES / "magic.rec", FIXTURES / "magic.idx")
    keys = reader.keys
    reader.read(keys[5])  # the parent's handle is open (and positioned) before the fork
    _INHERITED = reader
    expected = payloads("magic")
    chunks = [keys[i::4] for i in range(4)] * 3
    ctx = multiprocessing.get_context("fork")
    try:
        with ctx.Pool(4) as pool:
            pickled = pool.starmap(_read_keys, [(reader, c) for c in chunks])  # reader pickled to each task
            inherited = pool.map(_read_inherited, chunks)  # reader inherited through fork
            err = pool.apply(_read_bad, (reader,))
    finally:
        _INHERITED = None
    for c, got_p, got_i in zip(chunks, pickled, inherited):
        assert got_p == got_i == [expected[keys.index(k)] for k in c]
    assert isinstance(err, RecordIOError) and "magic.rec" in str(err) and "offset 2" in str(err)
    assert err.offset == 2
    assert reader.read(keys[6]) == expected[6]  # the parent's handle is untouched


def test_torch_dataloader_fork_workers():
    torch = pytest.importorskip("torch")

    class Ds(torch.utils.data.Dataset):
        def __init__(self):
            self.reader = IndexedRecordReader(FIXTURES / "images.rec", FIXTURES / "images.idx")

        def __len__(self):
            return 6

        def __getitem__(self, i):
            header, image = unpack(self.reader.read(i + 1))
            return int(header.label), len(image)

    ds = Ds()
    ds[0]
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2, multiprocessing_context="fork")
    labels = torch.cat([b[0] for b in loader]).tolist()
    assert labels == [0, 0, 1, 1, 2, 2]


# ----------------------------------------------------------------------------------------------------------------
# bad input: every error names the file and the record / line


def assert_error(excinfo, path, *parts):
    msg = str(excinfo.value)
    assert str(path) in msg, msg
    for p in parts:
        assert p in msg, msg
    assert isinstance(excinfo.value, InputError)


def lrec(cflag, length):
    return struct.pack("<II", MAGIC, cflag << 29 | length)


def test_truncated_header(tmp_path):
    rec, _ = copy_fixture(tmp_path, "plain")
    last = FILES["plain"]["records"][-1]["offset"]
    rec.write_bytes(rec.read_bytes()[: last + 5])
    with pytest.raises(RecordIOError) as e:
        list(RecordReader(rec))
    assert_error(e, rec, f"offset {last}", "truncated", "header cut short (5 of 8 bytes)")
    with pytest.raises(RecordIOError) as e:
        RecordReader(rec).read_at(last)
    assert_error(e, rec, f"offset {last}", "truncated")


def test_truncated_payload_and_padding(tmp_path):
    rec, _ = copy_fixture(tmp_path, "plain")
    data = rec.read_bytes()
    last = FILES["plain"]["records"][-1]  # 33 bytes: 3 padding bytes
    for cut in (last["offset"] + 8 + 10, len(data) - 1):
        rec.write_bytes(data[:cut])
        with pytest.raises(RecordIOError) as e:
            list(RecordReader(rec))
        assert_error(e, rec, f"offset {last['offset']}", "truncated", "payload cut short")
        with pytest.raises(RecordIOError) as e:
            list(RecordReader(rec).scan(payloads=False))
        assert_error(e, rec, f"offset {last['offset']}", "truncated")


def test_truncated_inside_split_record(tmp_path):
    rec, idx = copy_fixture(tmp_path, "magic")
    r = next(r for r in FILES["magic"]["records"] if r["name"] == "magic_at_0")
    rec.write_bytes(rec.read_bytes()[: r["offset"] + 8])  # only the (empty) first part survives
    with pytest.raises(RecordIOError) as e:
        IndexedRecordReader(rec, idx)  # later .idx offsets now lie past the end
    assert_error(e, idx, "line 5", "past the end")
    with pytest.raises(RecordIOError) as e:
        list(RecordReader(rec))
    assert_error(e, rec, f"offset {r['offset']}", "truncated", "split into parts")


def test_bad_magic(tmp_path):
    rec, idx = copy_fixture(tmp_path, "magic")
    r = FILES["magic"]["records"][7]
    data = bytearray(rec.read_bytes())
    data[r["offset"]] ^= 0xFF
    rec.write_bytes(bytes(data))
    with pytest.raises(RecordIOError) as e:
        list(RecordReader(rec))
    assert_error(e, rec, f"offset {r['offset']}", "bad magic number")
    with pytest.raises(RecordIOError) as e:
        IndexedRecordReader(rec, idx).read(r["key"])
    assert_error(e, rec, f"key {r['key']}", f"offset {r['offset']}", "bad magic number")


def test_bad_magic_in_a_later_part(tmp_path):
    rec = tmp_path / "x.rec"
    rec.write_bytes(lrec(1, 4) + b"abcd" + b"\0\0\0\0" + struct.pack("<I", 0))
    with pytest.raises(RecordIOError) as e:
        list(RecordReader(rec))
    assert_error(e, rec, "offset 0", "part header at byte 12")


def test_continuation_without_first_part(tmp_path):
    rec = tmp_path / "x.rec"
    rec.write_bytes(lrec(0, 4) + b"abcd" + lrec(2, 0) + lrec(3, 1) + b"z\0\0\0")
    with pytest.raises(RecordIOError) as e:
        list(RecordReader(rec))
    assert_error(e, rec, "offset 12", "continuation part (cflag 2) without its first part")


def test_split_record_missing_last_part(tmp_path):
    rec = tmp_path / "x.rec"
    rec.write_bytes(lrec(1, 4) + b"abcd" + lrec(0, 0))
    with pytest.raises(RecordIOError) as e:
        list(RecordReader(rec))
    assert_error(e, rec, "offset 0", "missing its last part", "byte 12 has cflag 0")


def test_idx_offset_inside_a_split_record(tmp_path):
    rec, idx = copy_fixture(tmp_path, "magic")
    r = next(r for r in FILES["magic"]["records"] if r["name"] == "magic_x3")
    idx.write_text(f"0\t{r['offset'] + 8}\n1\t{r['offset'] + 4 * 8}\n")  # 2nd part (cflag 2); then next record
    reader = IndexedRecordReader(rec, idx)
    with pytest.raises(RecordIOError) as e:
        reader.read(0)
    assert_error(e, rec, "key 0", f"offset {r['offset'] + 8}", "without its first part", "not at a record start")
    assert reader.read(1) == bytes.fromhex(FILES["magic"]["records"][r["key"] + 1]["payload"])


def test_idx_offset_inside_a_payload(tmp_path):
    rec, idx = copy_fixture(tmp_path, "plain")
    inside = FILES["plain"]["records"][-1]["offset"] + 8  # aligned, but the first payload bytes of a record
    idx.write_text(f"0\t0\n9\t{inside}\n")
    with pytest.raises(RecordIOError) as e:
        IndexedRecordReader(rec, idx).read(9)
    assert_error(e, rec, "key 9", "not at a record start", "bad magic")


@pytest.mark.parametrize(
    "bad,what",
    [
        ("5\t100000\n", ["key 5", "past the end of the .rec file"]),
        ("5\t-4\n", ["key 5", "negative"]),
        ("5\t18\n", ["key 5", "not at a record start"]),
        ("5 40\n", ["expected 'key<TAB>offset'"]),
        ("5\t40\textra\n", ["expected 'key<TAB>offset'"]),
        ("five\t40\n", ["must be integers"]),
        ("5\t4.0\n", ["must be integers"]),
        ("1\t16\n", ["duplicate key 1 (lines 2, 3)"]),
    ],
)
def test_idx_bad_lines_name_the_line(tmp_path, bad, what):
    rec, idx = copy_fixture(tmp_path, "magic")
    lines = idx.read_text().splitlines(keepends=True)
    lines[2] = bad
    idx.write_text("".join(lines))
    with pytest.raises(RecordIOError) as e:
        IndexedRecordReader(rec, idx)
    assert_error(e, idx, "line 3", *what)


@pytest.mark.parametrize("name", INDEXED)
def test_fast_and_line_index_parsers_agree(name):
    rec, idx = FIXTURES / f"{name}.rec", FIXTURES / f"{name}.idx"
    size = rec.stat().st_size
    slow = recordio._parse_index_lines(str(idx), size)
    fast = recordio._parse_index_fast(idx.read_bytes(), size)
    if name == "keyed":  # a negative key: left to the line parser
        assert fast is None
    else:
        np.testing.assert_array_equal(fast[0], slow[0])
        np.testing.assert_array_equal(fast[1], slow[1])


@pytest.mark.parametrize(
    "text",
    [
        "1\t4\n\n",
        "1\t4",
        "1\t\t4\n",
        "1\t4\t\n2\n",
        " 1\t4\n",
        "1\t4\r\n",
        "1\t5\n",
        "1\t100000\n",
        "1234567890123456789\t4\n",
        "+1\t4\n",
        "\t4\n",
        "1\t\n",
    ],
)
def test_fast_index_parser_defers_anything_unusual(text):
    assert recordio._parse_index_fast(text.encode(), 1000) is None


def test_idx_blank_lines_are_ignored(tmp_path):
    rec, idx = copy_fixture(tmp_path, "keyed")
    idx.write_text("\n" + idx.read_text() + "\n\n")
    reader = IndexedRecordReader(rec, idx)
    assert [reader.read(k) for k in reader.keys] == payloads("keyed")


@pytest.mark.parametrize(
    "offset,what",
    [
        (10**6, "past the end"),
        (-8, "negative"),
        (6, "not at a record start"),
        (60, "bad magic"),
        ("0", "must be an integer"),
    ],
)
def test_read_at_bad_offsets(offset, what):
    path = FIXTURES / "plain.rec"
    with pytest.raises(RecordIOError) as e:
        RecordReader(path).read_at(offset)
    assert_error(e, path, what)
    if isinstance(offset, int):
        assert f"offset {offset}" in str(e.value)


def test_empty_file_reads_nothing():
    reader = RecordReader(FIXTURES / "empty.rec")
    assert list(reader) == []
    with pytest.raises(RecordIOError, match="empty.rec.*offset 0.*past the end"):
        reader.read_at(0)


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="nope.rec"):
        RecordReader(FIXTURES / "nope.rec")


def test_writer_errors(tmp_path, monkeypatch):
    rec, idx = tmp_path / "w.rec", tmp_path / "w.idx"
    with IndexedRecordWriter(rec, idx) as w:
        w.write(3, b"abc")
        with pytest.raises(RecordIOError) as e:
            w.write(3, b"again")
        assert_error(e, idx, "key 3", "duplicate key")
        with pytest.raises(RecordIOError) as e:
            w.write(4, "text")
        assert_error(e, rec, "offset 12", "bytes-like")
        with pytest.raises(RecordIOError) as e:
            w.write(2.0, b"x")
        assert_error(e, idx, "key must be an integer")
        monkeypatch.setattr(recordio, "_MAX_PART", 16)
        w.write(5, b"a" * 12 + MAGIC_BYTES + b"b" * 15)  # each part < 16 bytes
        with pytest.raises(RecordIOError) as e:
            w.write(6, b"a" * 12 + MAGIC_BYTES + b"b" * 16)
        assert_error(e, rec, "offset 56", "part of 16 bytes")
        monkeypatch.setattr(recordio, "_MAX_RECORD", 20)
        with pytest.raises(RecordIOError) as e:
            w.write(7, b"c" * 20)
        assert_error(e, rec, "offset 56", "too large")
    monkeypatch.undo()
    assert IndexedRecordReader(rec, idx).keys == [3, 5]  # failed writes left nothing behind
    assert list(RecordReader(rec)) == [b"abc", b"a" * 12 + MAGIC_BYTES + b"b" * 15]
    with pytest.raises(ValueError, match="closed"):
        w.write(8, b"")


def test_error_pickles_with_its_message():
    err = RecordIOError("bad magic number", path="/x/y.rec", offset=8, key=2)
    assert str(err) == "/x/y.rec: record at key 2, offset 8: bad magic number"
    clone = pickle.loads(pickle.dumps(err))
    assert str(clone) == str(err) and (clone.path, clone.offset, clone.key) == ("/x/y.rec", 8, 2)
