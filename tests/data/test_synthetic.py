"""Generated identities: deterministic, face-sized, and written as a real RecordIO set plus a .bin of held-out pairs."""

import subprocess
import sys

import numpy as np
import pytest

from partial_fc.data.binfile import read_bin
from partial_fc.data.faceset import read_faceset_index, read_property, record_label
from partial_fc.data.lst import read_lst
from partial_fc.data.recordio import IndexedRecordReader, unpack
from partial_fc.data.synthetic import _pair_plan, identity_attributes, render_identity_image, write_synthetic_set
from partial_fc.errors import InputError
from tests.launchers import REPO


def test_images_are_deterministic_and_vary_within_an_identity():
    first = render_identity_image(seed=1, identity=3, index=0)
    assert first.shape == (112, 112, 3) and first.dtype == np.uint8
    assert np.array_equal(first, render_identity_image(seed=1, identity=3, index=0))
    assert not np.array_equal(first, render_identity_image(seed=1, identity=3, index=1))
    assert identity_attributes(1, 3) == identity_attributes(1, 3) != identity_attributes(1, 4)


def test_pairs_come_from_held_out_identities_and_alternate():
    plan = _pair_plan(holdout_start=50, holdout=10, images_per_identity=4, pairs=40, seed=0)
    assert [same for _, _, same in plan] == [True, False] * 20
    for (one, first), (other, second), same in plan:
        assert 50 <= one < 60 and 50 <= other < 60
        assert (one == other) == same
        if same:
            assert first != second


def test_written_set_reads_back(tmp_path):
    summary = write_synthetic_set(
        str(tmp_path), identities=12, images_per_identity=3, holdout_identities=4, pairs=20, workers=2, progress=False
    )
    assert summary.train_images == 36 and summary.pairs == 20
    reader = IndexedRecordReader(tmp_path / "train.rec", tmp_path / "train.idx")
    index = read_faceset_index(reader)
    labels = [
        record_label(unpack(reader.read(int(key)))[0], path=reader.path, key=int(key)) for key in index.image_keys
    ]
    assert labels == [identity for identity in range(12) for _ in range(3)]
    assert index.num_identities == 12 and read_property(tmp_path) == (12, 112, 112)
    entries = list(read_lst(tmp_path / "train.lst"))
    assert [(e.index, e.label) for e in entries] == [(int(k), label) for k, label in zip(index.image_keys, labels)]
    assert (tmp_path / "train.lst").read_text().splitlines()[0] == "1\t0.000000\tid_0/0_0.jpg"
    verification = read_bin(tmp_path / "synthetic.bin")
    assert verification.num_pairs == 20 and verification.issame == [True, False] * 10


def test_bad_sizes_fail_with_one_clear_message(tmp_path):
    job = subprocess.run(
        [
            sys.executable,
            "-m",
            "partial_fc",
            "make-synthetic",
            "--identities",
            "0",
            "--images-per-id",
            "3",
            "--out",
            str(tmp_path),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert job.returncode == 2 and "at least 1 identity" in job.stderr and "Traceback" not in job.stderr


def test_pairs_need_two_images_per_identity(tmp_path):
    with pytest.raises(InputError, match="2 images per identity"):
        write_synthetic_set(str(tmp_path), 5, 1, 4, 10, progress=False)
