"""Boxes of global tensors to and from a `torch.distributed.checkpoint` (DCP) directory.

DCP does the format and the parallel I/O: every rank writes its own file of the chunks in its
plan, the coordinator writes `.metadata` (every chunk's key, offsets and sizes) once all ranks
have written, and a load reads, on each rank, only the stored chunks that overlap the regions
it asks for. Kiln's two planners only say which chunks a rank has (`BoxSavePlanner`: rectangles
of flattened ZeRO partitions, see `state_pieces`) and where the regions it reads go
(`BoxLoadPlanner`: views of the live optimizer state, or of a module's weights).
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
)
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    ReadItem,
    SavePlan,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from data_pipeline.errors import KilnError


class CheckpointShapeError(KilnError):
    """A checkpoint's tensor does not have the shape this model needs."""


@dataclass(frozen=True)
class Region:
    """A rectangle (`offsets`, the shape of `tensor`) of the global tensor `key` of shape
    `size`: `tensor` holds its data when saving, and receives it when loading."""

    key: str
    size: tuple[int, ...]
    offsets: tuple[int, ...]
    tensor: torch.Tensor


def chunk_id(key: str, offsets: tuple[int, ...]) -> str:
    return f"{key}@{','.join(map(str, offsets))}"


class BoxSavePlanner(DefaultSavePlanner):
    """Writes the chunks it is given (a state dict of `chunk_id -> tensor`, plus byte objects
    under their own keys); DCP's global step keeps one copy of chunks offered by several ranks
    (balancing bytes), checks that the chunks of each tensor cover it without overlap, and
    builds the metadata."""

    def __init__(self, chunks: list[Region]) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.chunks = chunks

    def create_local_plan(self) -> SavePlan:
        items = []
        for chunk in self.chunks:
            offsets = torch.Size(chunk.offsets)
            tensor = self.state_dict[chunk_id(chunk.key, chunk.offsets)]
            items.append(
                WriteItem(
                    index=MetadataIndex(chunk.key, offsets),
                    type=WriteItemType.SHARD,
                    tensor_data=TensorWriteData(
                        chunk=ChunkStorageMetadata(offsets=offsets, sizes=tensor.size()),
                        properties=TensorProperties.create_from_tensor(tensor),
                        size=torch.Size(chunk.size),
                    ),
                )
            )
        chunk_ids = {chunk_id(c.key, c.offsets) for c in self.chunks}
        for key in self.state_dict:
            if key not in chunk_ids:
                items.append(WriteItem(index=MetadataIndex(key), type=WriteItemType.BYTE_IO))
        self.plan = SavePlan(items)
        return self.plan

    def lookup_object(self, index: MetadataIndex) -> Any:
        if index.offset is None:
            return self.state_dict[index.fqn]
        return self.state_dict[chunk_id(index.fqn, tuple(index.offset))]


def save_chunks(
    directory: Path,
    chunks: list[Region],
    objects: dict[str, Any],
    process_group=None,
) -> Metadata:
    """Collective: write every rank's chunks and objects (keys unique to the rank) into
    `directory`, one file per rank."""
    state = {chunk_id(c.key, c.offsets): c.tensor for c in chunks}
    state.update(objects)
    writer = dcp.FileSystemWriter(str(directory), single_file_per_rank=True, sync_files=True)
    alone = process_group is None and not torch.distributed.is_initialized()
    with one_process(alone):
        return dcp.save(
            state,
            storage_writer=writer,
            planner=BoxSavePlanner(chunks),
            process_group=process_group,
            no_dist=alone,
        )


@contextlib.contextmanager
def one_process(alone: bool):
    """Silence DCP's warning that it runs in one process, where Kiln means it to. (The
    warning filters are process-wide: never touched by the background saves, which are
    distributed.)"""
    if not alone:
        yield
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


class BoxLoadPlanner(DefaultLoadPlanner):
    """Reads regions of stored tensors into the given tensors, and byte objects by key."""

    def __init__(self, targets: list[Region], objects: list[str]) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.by_key: dict[str, list[Region]] = defaultdict(list)
        for target in targets:
            self.by_key[target.key].append(target)
        self.object_keys = objects
        self.objects: dict[str, Any] = {}

    def create_local_plan(self) -> LoadPlan:
        assert self.metadata is not None
        stored = self.metadata.state_dict_metadata
        items: list[ReadItem] = []
        for key, targets in self.by_key.items():
            metadata = stored.get(key)
            if metadata is None or isinstance(metadata, BytesStorageMetadata):
                raise CheckpointShapeError(f"the checkpoint has no tensor {key}")
            size = tuple(metadata.size)
            if size != targets[0].size:
                raise CheckpointShapeError(
                    f"{key}: the checkpoint's shape {size} does not fit this model's "
                    f"{targets[0].size}"
                )
            regions = [
                ChunkStorageMetadata(torch.Size(t.offsets), t.tensor.size()) for t in targets
            ]
            items += create_read_items_for_chunk_list(key, metadata, regions)
        for key in self.object_keys:
            index = MetadataIndex(key)
            items.append(
                ReadItem(
                    type=LoadItemType.BYTE_IO,
                    dest_index=index,
                    dest_offsets=torch.Size((0,)),
                    storage_index=index,
                    storage_offsets=torch.Size((0,)),
                    lengths=torch.Size((0,)),
                )
            )
        return LoadPlan(items)

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        index = read_item.dest_index
        target = self.by_key[index.fqn][index.index]
        tensor = target.tensor
        for dim, (offset, length) in enumerate(
            zip(read_item.dest_offsets, read_item.lengths, strict=True)
        ):
            tensor = tensor.narrow(dim, offset, length)
        return tensor

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        self.objects[read_item.dest_index.fqn] = torch.load(value, weights_only=False)


def load_regions(
    directory: Path, targets: list[Region], objects: list[str] = (), process_group=None
) -> dict[str, Any]:
    """Collective (when distributed): fill every target from `directory`; returns the byte
    objects asked for."""
    planner = BoxLoadPlanner(targets, list(objects))
    alone = process_group is None and not torch.distributed.is_initialized()
    with one_process(alone):
        dcp.load(
            {},
            storage_reader=dcp.FileSystemReader(str(directory)),
            planner=planner,
            process_group=process_group,
            no_dist=alone,
        )
    return planner.objects


def read_metadata(directory: Path) -> Metadata:
    return dcp.FileSystemReader(str(directory)).read_metadata()
