"""MXNet `.lst` files: written as im2rec writes them, read back, bad lines named by file and line."""

import pytest

from partial_fc.data.lst import LstEntry, LstError, read_lst, write_lst


def test_round_trip_in_mxnet_format(tmp_path):
    entries = [LstEntry(0, 3, "a/x.jpg"), LstEntry(7, 0, "b/y z.png")]
    assert write_lst(tmp_path / "set.lst", entries) == 2
    assert (tmp_path / "set.lst").read_text() == "0\t3.000000\ta/x.jpg\n7\t0.000000\tb/y z.png\n"
    assert list(read_lst(tmp_path / "set.lst")) == entries


@pytest.mark.parametrize(
    "line, message",
    [
        ("1\t2.0\n", "expected 3 tab-separated fields"),
        ("x\t2.0\ta.jpg\n", "is not a number"),
        ("1\t-1.0\ta.jpg\n", "label -1.0"),
        ("1\t2.5\ta.jpg\n", "label 2.5"),
    ],
)
def test_bad_lines_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.lst"
    path.write_text("0\t1.000000\tok.jpg\n" + line)
    with pytest.raises(LstError, match=message) as error:
        list(read_lst(path))
    assert f"{path}, line 2" in str(error.value)
