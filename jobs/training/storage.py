"""Small files shared by the training driver and its Ray Train workers, on local paths and object stores alike
(`TULPAR_STORAGE` may be `s3://...`): text files (the run's error file) and torch-saved objects (prepared rows)."""

from __future__ import annotations

import io
import uuid
from typing import Any

import torch


def filesystem_for(uri: str):
    """(pyarrow filesystem, path) for a local path or a URI such as s3://bucket/key."""
    from pyarrow import fs

    return fs.FileSystem.from_uri(uri)


def exists(uri: str) -> bool:
    from pyarrow import fs

    filesystem, path = filesystem_for(uri)
    return filesystem.get_file_info(path).type != fs.FileType.NotFound


def write_bytes(uri: str, data: bytes) -> None:
    """Write `data` whole: to a temporary name moved into place locally (readers never see a partial file; an
    object store's put is atomic by itself)."""
    filesystem, path = filesystem_for(uri)
    filesystem.create_dir(path.rsplit("/", 1)[0], recursive=True)
    local = filesystem.type_name == "local"
    target = f"{path}.tmp-{uuid.uuid4().hex}" if local else path
    with filesystem.open_output_stream(target) as f:
        f.write(data)
    if local:
        filesystem.move(target, path)


def read_bytes(uri: str) -> bytes | None:
    """The file's content; None when it does not exist."""
    if not exists(uri):
        return None
    filesystem, path = filesystem_for(uri)
    with filesystem.open_input_stream(path) as f:
        return f.read()


def delete(uri: str) -> None:
    """Remove the file if it exists."""
    if exists(uri):
        filesystem, path = filesystem_for(uri)
        filesystem.delete_file(path)


def put_object(uri: str, obj: Any) -> None:
    """torch.save `obj` to a local path or object-store URI (workers read it with get_object)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    write_bytes(uri, buf.getvalue())


def get_object(uri: str) -> Any:
    data = read_bytes(uri)
    if data is None:
        raise FileNotFoundError(
            f"{uri} does not exist (written by the training driver before the workers start)"
        )
    return torch.load(io.BytesIO(data), weights_only=False)
