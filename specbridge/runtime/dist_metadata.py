"""A torch_dist checkpoint's `.metadata` (a pickle), read as plain fields without torch.distributed.checkpoint.

The pickle names torch.distributed.checkpoint's metadata classes; importing that package costs a process
~0.5 s (it loads DTensor), more than a direct export spends reading its tensors. The restricted unpickler here
resolves each allowed class name to a stand-in that only holds the fields the pickle sets (`_Fields`), and the
two enums to their values; anything else is refused. What reads the result asks for fields by name
(`Metadata.state_dict_metadata`, `TensorStorageMetadata.size` / `.chunks` / `.properties.dtype`,
`_StorageInfo.relative_path`...) and checks their types; megatron-core's own loader unpickles the file itself.
"""

from __future__ import annotations

import enum
import io
import pickle
from pathlib import Path

import torch

from ..errors import ConversionError

DCP = "torch.distributed.checkpoint"


class _Fields:
    """An object of one of torch.distributed.checkpoint's metadata classes, as the fields its pickle sets."""

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2 and (state[0] is None or isinstance(state[0], dict)) \
                and isinstance(state[1], dict):  # (dict, slots): a dataclass with __slots__
            state = {**(state[0] or {}), **state[1]}
        if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
            raise pickle.UnpicklingError(f"{type(self).__name__}: unexpected pickled state")
        self.__dict__.update(state)


class TensorProperties(_Fields):
    def __setstate__(self, state):  # torch pickles (dtype, layout, requires_grad, memory format, pin_memory)
        if not isinstance(state, tuple) or len(state) != 5:
            raise pickle.UnpicklingError("TensorProperties: unexpected pickled state")
        self.dtype, self.layout, self.requires_grad, self.memory_format, self.pin_memory = state


def _stand_in(name: str, **defaults) -> type:
    """`defaults`: the class's fields with defaults, which a pickle may leave out (as it did when they were unset)."""
    return type(name, (_Fields,), {"__module__": __name__, "__qualname__": name, **defaults})


Metadata = _stand_in("Metadata", planner_data=None, storage_data=None, storage_meta=None, version=None)
TensorStorageMetadata = _stand_in("TensorStorageMetadata")
BytesStorageMetadata = _stand_in("BytesStorageMetadata")
ChunkStorageMetadata = _stand_in("ChunkStorageMetadata")
MetadataIndex = _stand_in("MetadataIndex", offset=None, index=None)
StorageMeta = _stand_in("StorageMeta", checkpoint_id=None, save_id=None, load_id=None)
StorageInfo = _stand_in("_StorageInfo", transform_descriptors=None)
SavePlan, WriteItem, TensorWriteData = map(_stand_in, ("SavePlan", "WriteItem", "TensorWriteData"))


class MemoryFormat(enum.Enum):  # torch's _MEM_FORMAT_ENCODING: pickled by value
    TORCH_CONTIGUOUS_FORMAT = 0
    TORCH_CHANNELS_LAST = 1
    TORCH_PRESERVE_FORMAT = 2


class WriteItemType(enum.Enum):
    TENSOR = enum.auto()
    SHARD = enum.auto()
    BYTE_IO = enum.auto()


# (module, name) a `.metadata` pickle may name -> what it builds here
_GLOBALS = {
    **{(f"{DCP}.metadata", c.__name__): c for c in (Metadata, TensorStorageMetadata, BytesStorageMetadata,
                                                   ChunkStorageMetadata, TensorProperties, MetadataIndex,
                                                   StorageMeta)},
    (f"{DCP}.metadata", "_MEM_FORMAT_ENCODING"): MemoryFormat,
    (f"{DCP}.filesystem", "_StorageInfo"): StorageInfo,
    **{(f"{DCP}.planner", c.__name__): c for c in (SavePlan, WriteItem, TensorWriteData, WriteItemType)},
    ("torch.serialization", "_get_layout"): torch.serialization._get_layout,
    ("torch", "Size"): torch.Size,
    ("collections", "OrderedDict"): dict,
}


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _GLOBALS:
            return _GLOBALS[module, name]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"'{module}.{name}' is not a checkpoint-metadata type")


def read(path: Path) -> Metadata:
    """The metadata of the checkpoint `path` (its `.metadata` file) with `storage_data` and
    `state_dict_metadata` mappings; a ConversionError for any other pickle."""
    if not path.is_file():
        raise ConversionError(f"'{path.parent}' is not a torch_dist checkpoint (no .metadata)")
    try:
        metadata = _Unpickler(io.BytesIO(path.read_bytes())).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, TypeError, ValueError, IndexError,
            KeyError, RecursionError) as exc:
        raise ConversionError(f"refusing '{path}': {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") \
            from None
    if not isinstance(metadata, Metadata) or not isinstance(getattr(metadata, "storage_data", None), dict) or \
            not isinstance(getattr(metadata, "state_dict_metadata", None), dict):
        raise ConversionError(f"refusing '{path}': not a torch.distributed.checkpoint Metadata")
    return metadata


def key_shapes(metadata: Metadata) -> dict[str, list[int]]:
    """Checkpoint key -> global shape, of every tensor in a checkpoint's metadata (what `save` records)."""
    return {key: list(entry.size) for key, entry in metadata.state_dict_metadata.items()
            if isinstance(entry, TensorStorageMetadata)}


__all__ = ["BytesStorageMetadata", "Metadata", "TensorStorageMetadata", "key_shapes", "read"]
