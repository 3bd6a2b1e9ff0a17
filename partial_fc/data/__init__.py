"""Dataset input. Re-exports the public names of ``recordio`` (native MXNet RecordIO ``.rec`` / ``.idx``)."""

from partial_fc.data.recordio import (
    MAGIC,
    IndexedRecordReader,
    IndexedRecordWriter,
    IRHeader,
    RecordIOError,
    RecordReader,
    RecordWriter,
    pack,
    pack_header,
    rebuild_index,
    unpack,
)

__all__ = [
    "MAGIC",
    "IRHeader",
    "IndexedRecordReader",
    "IndexedRecordWriter",
    "RecordIOError",
    "RecordReader",
    "RecordWriter",
    "pack",
    "pack_header",
    "rebuild_index",
    "unpack",
]
