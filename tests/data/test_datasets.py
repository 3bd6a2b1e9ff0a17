"""Datasets on real files (RecordIO face sets, image folders, pair lists) and the training DataLoader."""

import os
import subprocess
import sys

import cv2
import numpy as np
import psutil
import pytest
import torch
from torch.utils.data import default_collate

from partial_fc.data.bad_records import BadRecord
from partial_fc.data.datasets import (
    ImageFolderDataset,
    PairListDataset,
    RandomFaceDataset,
    RecordFaceDataset,
    StackedSamples,
    SyntheticDataset,
)
from partial_fc.data.decode import DecodeError, decode_rgb
from partial_fc.data.loader import LoadedBatch, build_loader, collate, device_batch, to_device
from partial_fc.data.recordio import IndexedRecordWriter, IRHeader, RecordIOError, pack
from partial_fc.data.sampler import DistributedEpochSampler, SeededBatch
from partial_fc.data.synthetic import render_identity_image
from partial_fc.errors import DatasetError
from partial_fc.eval.verification import evaluate_model
from tests.faces import face_jpeg, write_faceset
from tests.launchers import REPO

SIZE = 24
IDENTITIES, PER_IDENTITY = 4, 3


def _jpeg(identity: int, index: int, size: int = SIZE) -> bytes:
    return face_jpeg(identity, index, size)


@pytest.fixture(scope="module")
def faceset(tmp_path_factory):
    return write_faceset(tmp_path_factory.mktemp("faceset"), IDENTITIES, PER_IDENTITY, SIZE)


def _headerless(directory, labels, payloads=None):
    """A set written as plain MXNet im2rec would: keys 0..N-1, scalar labels, no header, no property."""
    rec, idx = directory / "plain.rec", directory / "plain.idx"
    with IndexedRecordWriter(rec, idx) as writer:
        for i, label in enumerate(labels):
            payload = _jpeg(label % IDENTITIES, i) if payloads is None else payloads[i]
            writer.write(i, pack(IRHeader(0, float(label), i, 0), payload))
    return rec, idx


def test_faceset_items_labels_and_classes(faceset):
    ds = RecordFaceDataset(faceset, flip=False)
    assert len(ds) == IDENTITIES * PER_IDENTITY and ds.num_classes == IDENTITIES
    expected = np.repeat(np.arange(IDENTITIES), PER_IDENTITY)
    assert np.array_equal(ds.labels(), expected) and ds.labels().dtype == np.int64
    image, label = ds[4]
    assert image.dtype == torch.uint8 and image.shape == (SIZE, SIZE, 3)
    assert label.dtype == torch.int64 and label.item() == 1
    assert np.array_equal(image.numpy(), decode_rgb(_jpeg(1, 1)))
    resized = RecordFaceDataset(faceset, image_size=(16, 20), flip=False)
    assert resized[0][0].shape == (16, 20, 3)


def test_headerless_set_by_paths(tmp_path):
    rec, idx = _headerless(tmp_path, [2, 0, 1, 2, 0])
    ds = RecordFaceDataset(rec=rec, idx=idx, flip=False)
    assert len(ds) == 5 and ds.num_classes == 3  # no property, no header: max label + 1
    assert np.array_equal(ds.labels(), [2, 0, 1, 2, 0])
    assert [int(ds[i][1]) for i in range(5)] == [2, 0, 1, 2, 0]
    with pytest.raises(DatasetError, match="either root or both"):
        RecordFaceDataset(rec=rec)


def test_label_outside_num_classes_fails_when_opened_naming_file_key_and_value(tmp_path):
    rec, idx = _headerless(tmp_path, [0, 1, 7, 2, 9])
    assert np.array_equal(RecordFaceDataset(rec=rec, idx=idx, num_classes=10).labels(), [0, 1, 7, 2, 9])
    with pytest.raises(
        RecordIOError,
        match=rf"{rec}: record at key 2, offset \d+: label 7 is outside "
        r"\[0, num_classes=5\) \(and 1 more; `partial-fc check-data`",
    ):
        RecordFaceDataset(rec=rec, idx=idx, num_classes=5, flip=False)


def test_property_num_classes_is_enforced(faceset, tmp_path):
    for name in ("train.rec", "train.idx"):
        (tmp_path / name).write_bytes((faceset / name).read_bytes())
    (tmp_path / "property").write_text(f"{IDENTITIES - 1},{SIZE},{SIZE}\n")
    first_key = (IDENTITIES - 1) * PER_IDENTITY + 1  # images are keys 1..N; the last identity is out of range
    with pytest.raises(RecordIOError, match=rf"key {first_key}, offset \d+: label {IDENTITIES - 1} is outside"):
        RecordFaceDataset(tmp_path, flip=False)


@pytest.mark.parametrize(
    "label,text",
    [
        (-1, "label -1 is not a class id"),
        (1.5, "label 1.5 is not a class id"),
        (float("nan"), "label nan is not a class id"),
    ],
)
def test_label_that_is_no_class_id_fails_when_opened(tmp_path, label, text):
    rec, idx = _headerless(tmp_path, [0, label, 1], payloads=[_jpeg(0, key) for key in range(3)])
    with pytest.raises(RecordIOError, match=rf"{rec}: record at key 1, offset \d+: {text}"):
        RecordFaceDataset(rec=rec, idx=idx, num_classes=2, flip=False)


def test_zeroed_magic_fails_when_opened_naming_file_and_key(tmp_path):
    rec, idx = _headerless(tmp_path, [0, 1, 0])
    offset = int(idx.read_text().splitlines()[1].split("\t")[1])
    with open(rec, "r+b") as f:
        f.seek(offset)
        f.write(bytes(4))
    with pytest.raises(
        RecordIOError,
        match=rf"{rec}: record at key 1, offset {offset}: .*bad magic number "
        "0x00000000",
    ):
        RecordFaceDataset(rec=rec, idx=idx, flip=False)


def test_header_scan_agrees_with_reading_every_record(tmp_path):
    """Scalar, array and lossless (past 2**24) labels, and a record split at an aligned magic number."""
    from partial_fc.data.faceset import image_header
    from partial_fc.data.recordio import MAGIC

    headers = [
        IRHeader(0, 3.0, 0, 0),
        IRHeader(2, [5.0, 9.0], 1, 0),
        image_header(1 << 25, 2),
        IRHeader(0, 4.0, MAGIC, 0),
    ]  # an id holding the magic number splits the record inside its header
    rec, idx = tmp_path / "mixed.rec", tmp_path / "mixed.idx"
    with IndexedRecordWriter(rec, idx) as writer:
        for key, header in enumerate(headers):
            writer.write(key, pack(header, _jpeg(0, key)))
    assert (int.from_bytes(rec.read_bytes()[int(idx.read_text().split()[-1]) + 4 :][:4], "little") >> 29) == 1
    ds = RecordFaceDataset(rec=rec, idx=idx, flip=False)
    assert ds.labels().tolist() == [3, 5, 1 << 25, 4] and ds.num_classes == (1 << 25) + 1


def _corrupt_set(tmp_path, garbage_keys=(), truncate=False):
    """A header-less set of 8 JPEGs (labels 0..7) whose ``garbage_keys`` hold no image; ``truncate`` cuts the file
    inside key 6's payload, so key 7's offset lies past the end."""
    payloads = [
        b"\xff\xd8 not a jpeg at all" if key in garbage_keys else _jpeg(key % IDENTITIES, key) for key in range(8)
    ]
    rec, idx = _headerless(tmp_path, list(range(8)), payloads)
    if truncate:
        offsets = [int(line.split("\t")[1]) for line in idx.read_text().splitlines()]
        with open(rec, "r+b") as f:
            f.truncate(offsets[6] + 100)
    return rec, idx


def test_bad_records_are_skipped_and_refilled_with_the_next_that_decodes(tmp_path):
    rec, idx = _corrupt_set(tmp_path, garbage_keys=(2, 3), truncate=True)
    ds = RecordFaceDataset(rec=rec, idx=idx, image_size=(SIZE, SIZE), flip=False)
    size = rec.stat().st_size
    assert [(record.key, record.reason) for record in ds.cut_off] == [
        (6, f"truncated file: the record runs past the end of the file ({size} bytes)"),
        (7, f"offset is past the end of the file ({size} bytes)"),
    ]
    with pytest.raises(DecodeError, match=rf"{rec}, key 2: cannot decode image"):
        ds[2]  # one item on its own still raises
    samples = ds.__getitems__([2, 1, 6, 7])
    assert samples.labels.tolist() == [4, 1, 0, 0]  # 2 -> 3 -> 4; 6 (cut short) -> 7 (gone) -> 0 (wraps around)
    assert torch.equal(samples.images[0], ds[4][0]) and torch.equal(samples.images[2], ds[0][0])
    offsets = [int(line.split("\t")[1]) for line in idx.read_text().splitlines()]
    assert [(record.file, record.key, record.offset) for record in samples.bad_records] == [
        (str(rec), key, offsets[key]) for key in (2, 3, 6, 7)
    ]
    reasons = [record.reason for record in samples.bad_records]
    assert reasons[0].startswith("cannot decode image (20 bytes") and reasons[1] == reasons[0]
    assert reasons[2].startswith("truncated file: payload cut short")
    assert reasons[3] == f"offset is past the end of the file ({size} bytes)"
    assert str(samples.bad_records[0]).startswith(f"{rec}, key 2, offset {offsets[2]}: cannot decode image")


def test_a_batch_gives_up_past_max_bad_per_batch_with_unfilled_slots(tmp_path):
    rec, idx = _corrupt_set(tmp_path, garbage_keys=(1, 2, 3, 4))
    ds = RecordFaceDataset(rec=rec, idx=idx, image_size=(SIZE, SIZE), flip=False, max_bad_per_batch=2)
    samples = ds.__getitems__([0, 1, 5])
    assert samples.labels.tolist() == [0, -1, 5] and not samples.images[1].any()
    assert [record.key for record in samples.bad_records] == [1, 2, 3]


def _batches_by_position(ds, ranks, batch, workers, epochs=2):
    """Every (global position -> image, label, bad keys) of two shuffled epochs on ``ranks`` ranks."""
    seen = {}
    for rank in range(ranks):
        sampler = DistributedEpochSampler(len(ds), rank, ranks, seed=7)
        loader = build_loader(ds, batch, sampler, num_workers=workers, seed=7, drop_last=False)
        for epoch in range(epochs):
            for number, loaded in enumerate(loader):
                bad = sorted(record.key for record in loaded.bad_records)
                for slot, (image, label) in enumerate(zip(loaded.images, loaded.labels)):
                    position = (number * batch + slot) * ranks + rank
                    seen[epoch, position] = (image, int(label), bad if ranks == 1 else None)
    return seen


def test_refilled_batches_are_the_same_on_any_number_of_ranks_and_workers(tmp_path):
    rec, idx = _corrupt_set(tmp_path, garbage_keys=(2, 3, 5))
    ds = RecordFaceDataset(rec=rec, idx=idx, image_size=(SIZE, SIZE), flip=True)
    one = _batches_by_position(ds, 1, 4, 0)
    for ranks, batch, workers in ((1, 4, 2), (2, 2, 1), (2, 2, 2)):
        other = _batches_by_position(ds, ranks, batch, workers)
        assert sorted(other) == sorted(one)
        assert all(torch.equal(other[at][0], one[at][0]) and other[at][1] == one[at][1] for at in one)
    labels = [label for _, label, _ in one.values()]
    assert set(labels) == {0, 1, 4, 6, 7} and labels.count(4) > 2  # 2 and 3 refill with 4, 5 with 6
    assert {key for _, _, bad in one.values() for key in bad} == {2, 3, 5}


def test_pinned_batches_keep_their_bad_records(monkeypatch):
    from torch.utils.data._utils.pin_memory import pin_memory  # what DataLoader(pin_memory=True) applies

    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda tensor, *args, **kwargs: tensor.clone())  # no CUDA here
    bad = [BadRecord("train.rec", 3, 96, "cannot decode image")]
    pinned = pin_memory(LoadedBatch(torch.zeros(2, 4, 4, 3, dtype=torch.uint8), torch.tensor([1, 2]), bad))
    images, labels = pinned
    assert isinstance(pinned, LoadedBatch) and pinned.bad_records == bad and labels.tolist() == [1, 2]


def test_unreadable_image_file_is_skipped(tmp_path):
    for identity in range(2):
        for index in range(2):
            _write_image(
                tmp_path / f"id{identity}" / f"{index}.jpg", render_identity_image(0, identity, index, SIZE), ".jpg"
            )
    (tmp_path / "id0" / "1.jpg").write_bytes(b"broken")
    ds = ImageFolderDataset(tmp_path, image_size=(SIZE, SIZE), flip=False)
    (tmp_path / "id1" / "0.jpg").unlink()  # gone after the folder was listed
    samples = ds.__getitems__([1, 2])
    assert samples.labels.tolist() == [1, 1]
    assert [(record.file, record.key, record.reason[:20]) for record in samples.bad_records] == [
        (str(tmp_path / "id0" / "1.jpg"), None, "cannot decode image "),
        (str(tmp_path / "id1" / "0.jpg"), None, "cannot read: No such"),
    ]


def _write_image(path, rgb, ext):
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, buf = cv2.imencode(ext, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert ok
    path.write_bytes(buf.tobytes())


def test_image_folder(tmp_path):
    for identity, name in enumerate(["bob", "alice", "carol"]):
        for index in range(2):
            ext = ".png" if index else ".jpg"
            _write_image(tmp_path / name / f"{index}{ext}", render_identity_image(0, identity, index, SIZE), ext)
    (tmp_path / "alice" / "notes.txt").write_text("not an image")
    ds = ImageFolderDataset(tmp_path, image_size=None, flip=False)
    assert ds.classes == ["alice", "bob", "carol"] and ds.num_classes == 3 and len(ds) == 6
    assert np.array_equal(ds.labels(), [0, 0, 1, 1, 2, 2])
    image, label = ds[3]  # bob's png
    assert label.item() == 1 and label.dtype == torch.int64
    assert np.array_equal(image.numpy(), render_identity_image(0, 0, 1, SIZE))  # png is lossless


def test_image_folder_errors_name_the_folder(tmp_path):
    with pytest.raises(DatasetError, match=rf"{tmp_path}: no identity folders"):
        ImageFolderDataset(tmp_path)
    _write_image(tmp_path / "a" / "0.jpg", render_identity_image(0, 0, 0, SIZE), ".jpg")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "readme.txt").write_text("x")
    with pytest.raises(DatasetError, match=rf"{tmp_path / 'b'}: identity folder holds no images"):
        ImageFolderDataset(tmp_path)


def _pair_set(tmp_path, pairs=10):
    lines = []
    for i in range(pairs):
        same = i % 2 == 0
        a, b = f"p{i}/a.jpg", f"p{i}/b.png"
        _write_image(tmp_path / "images" / a, render_identity_image(1, i, 0, SIZE), ".jpg")
        _write_image(tmp_path / "images" / b, render_identity_image(1, i if same else i + 100, 1, SIZE), ".png")
        lines.append(f"{a} {b} {int(same)}")
    (tmp_path / "pair.list").write_text("\n".join(lines) + "\n")
    return tmp_path / "pair.list", tmp_path / "images"


def test_pair_list_loads_for_verification(tmp_path):
    pair_list, root = _pair_set(tmp_path)
    ds = PairListDataset(pair_list, root, image_size=(16, 16))
    assert len(ds) == 10
    first, second, issame = ds[1]
    assert first.shape == second.shape == (3, 16, 16) and issame is False
    images, flags = ds.load()
    assert images.shape == (20, 3, 16, 16) and images.dtype == torch.float32
    assert flags == [i % 2 == 0 for i in range(10)]
    assert torch.equal(images[2], first) and torch.equal(images[3], second)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 8))
    result = evaluate_model(model, images, flags, batch_size=8)
    assert 0.0 <= result.accuracy <= 1.0


@pytest.mark.parametrize("line,lineno", [("a.jpg b.jpg", 2), ("a.jpg b.jpg 2", 2), ("a b 1 extra", 2)])
def test_malformed_pair_line_names_file_and_line(tmp_path, line, lineno):
    path = tmp_path / "pair.list"
    path.write_text(f"x.jpg y.jpg 1\n{line}\n")
    with pytest.raises(DatasetError, match=rf"{path}, line {lineno}: expected 'path1 path2 issame"):
        PairListDataset(path, tmp_path)


def test_pair_list_missing_image_names_it(tmp_path):
    path = tmp_path / "pair.list"
    path.write_text("x.jpg y.jpg 1\n")
    with pytest.raises(DatasetError, match=rf"{tmp_path / 'x.jpg'} \(listed in {path}\)"):
        PairListDataset(path, tmp_path).load()


def test_random_faces_are_deterministic():
    a, b = RandomFaceDataset(100, 7, (8, 8), seed=1), SyntheticDataset(100, 7, (8, 8), seed=1)
    assert len(a) == 100 and a.num_classes == 7
    for i in (0, 63, 64, 99):
        assert torch.equal(a[i][0], b[i][0]) and torch.equal(a[i][1], b[i][1])
        assert a[i][0].shape == (8, 8, 3) and a[i][0].dtype == torch.uint8 and a[i][1].dtype == torch.int64
    assert a.labels().min() >= 0 and a.labels().max() < 7
    assert not torch.equal(RandomFaceDataset(100, 7, (8, 8), seed=2)[0][0], a[0][0])


def _run(dataset, workers, seed, batches=None, state=None, start_method=None):
    """The batches (and the sampler state after them) of one loader run of epoch 0 on rank 1 of 2."""
    sampler = DistributedEpochSampler(len(dataset), 1, 2, seed=seed)
    if state is not None:
        sampler.load_state_dict(state)
    loader = build_loader(
        dataset, 2, sampler, num_workers=workers, seed=seed, drop_last=False, start_method=start_method
    )
    out = []
    for images, labels in loader:
        out.append((images, labels))
        if len(out) == batches:
            return out, sampler.state_dict()
    assert (sampler.epoch, sampler.position) == (1, 0)  # a finished epoch moves on
    return out, sampler.state_dict()


def _same(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) and torch.equal(u, v) for (x, u), (y, v) in zip(a, b))


def test_loader_reproducible_across_runs_workers_and_restore(faceset):
    ds = RecordFaceDataset(faceset, flip=True)
    ds[0]  # open the reader in this process first: workers must open their own
    first, _ = _run(ds, 2, seed=3)
    second, _ = _run(ds, 2, seed=3)
    assert len(first) == 3 and _same(first, second)
    assert _same(first, _run(ds, 0, seed=3)[0])  # flips follow the batch, not the worker
    assert _same(first, _run(ds, 2, seed=3, start_method="forkserver")[0])  # the trainer's start on a CPU
    assert not _same(first, _run(ds, 2, seed=4)[0])
    head, state = _run(ds, 2, seed=3, batches=1)
    assert state["position"] == 2
    tail, _ = _run(ds, 2, seed=3, state=state)
    assert _same(head + tail, first)
    plain, _ = _run(RecordFaceDataset(faceset, flip=False), 0, seed=3)
    flipped = [torch.equal(f, torch.flip(p, [1])) for (fb, _), (pb, _) in zip(first, plain) for f, p in zip(fb, pb)]
    kept = [torch.equal(f, p) for (fb, _), (pb, _) in zip(first, plain) for f, p in zip(fb, pb)]
    assert all(a or b for a, b in zip(flipped, kept)) and any(flipped) and any(kept)


_KILLED_TRAINER = """
import sys, time
from partial_fc.data.datasets import RandomFaceDataset
from partial_fc.data.loader import build_loader
from partial_fc.data.sampler import DistributedEpochSampler
dataset = RandomFaceDataset(64, 4, (8, 8), seed=1)
loader = build_loader(dataset, 2, DistributedEpochSampler(64, 0, 1), num_workers=2, start_method="forkserver")
next(iter(loader))
print(" ".join(str(worker.pid) for worker in loader._iterator._workers), flush=True)
time.sleep(600)
"""


def test_workers_started_through_a_fork_server_end_with_a_killed_trainer():
    """Their parent is the fork server, which outlives a trainer killed with SIGKILL (or ended by os._exit)."""
    trainer = subprocess.Popen(
        [sys.executable, "-c", _KILLED_TRAINER],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        workers = [psutil.Process(int(pid)) for pid in trainer.stdout.readline().split()]
        assert len(workers) == 2 and all(worker.ppid() != trainer.pid for worker in workers)
    finally:
        trainer.kill()
        trainer.wait(timeout=30)
    gone, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive, f"workers {[worker.pid for worker in alive]} outlived their trainer"


def test_device_batch_normalises_the_uint8_batch(faceset):
    images, labels = collate(RecordFaceDataset(faceset, flip=False).__getitems__([0, 1, 2]))
    inputs, moved = device_batch((images, labels), "cpu")
    assert inputs.shape == (3, 3, SIZE, SIZE) and inputs.dtype == torch.float32 and torch.equal(moved, labels)
    assert torch.equal(inputs, (images.permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5)


def test_to_device_keeps_structure():
    batch = (torch.ones(2, 3), {"labels": torch.arange(2)}, [torch.zeros(1)], "tag")
    moved = to_device(batch, "cpu")
    assert isinstance(moved, tuple) and moved[3] == "tag"
    assert torch.equal(moved[0], batch[0]) and torch.equal(moved[1]["labels"], batch[1]["labels"])


def test_loader_continues_after_a_break_and_counts_only_delivered_batches(faceset):
    ds = RecordFaceDataset(faceset, flip=True)
    uninterrupted, _ = _run(ds, 2, seed=5)
    sampler = DistributedEpochSampler(len(ds), 1, 2, seed=5)
    loader = build_loader(ds, 2, sampler, num_workers=2, seed=5, drop_last=False)
    assert loader.pin_memory == torch.cuda.is_available() and len(loader) == 3
    it = iter(loader)
    head = [next(it)]  # workers have prefetched further; only this batch counts
    assert sampler.position == 2 and len(loader) == 2
    del it
    tail = list(loader)
    assert _same(head + tail, uninterrupted)
    assert (sampler.epoch, len(loader)) == (1, 3)


def test_batches_are_decoded_in_place_and_match_single_items(faceset):
    ds = RecordFaceDataset(faceset, flip=True)
    batch = SeededBatch([5, 0, 11, 3], (1, 2), [7, 9, 11, 13])
    samples = ds.__getitems__(batch)
    assert isinstance(samples, StackedSamples) and len(samples) == 4
    images, labels = collate(samples)
    assert images.shape == (4, SIZE, SIZE, 3) and images.dtype == torch.uint8 and labels.tolist() == [1, 0, 3, 1]
    singles = [ds._sample(index, draw) for index, draw in zip(batch, batch.uniforms())]  # one image at a time
    assert torch.equal(images, torch.stack([image for image, _ in singles]))
    stacked_by_default = default_collate(samples)  # a plain DataLoader still works on them
    assert torch.equal(stacked_by_default[0], images) and torch.equal(stacked_by_default[1], labels)
    sized_by_image = RecordFaceDataset(faceset, flip=False)
    sized_by_image.image_size = None
    assert not isinstance(sized_by_image.__getitems__([0, 1]), StackedSamples)
