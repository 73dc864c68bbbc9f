"""One checkpoint file from a sharded checkpoint folder (FSDP2 / FSDP distributed checkpoint, DeepSpeed
ZeRO), for `export` and `load_from_checkpoint`: the model weights gathered in one process, optimizer
states left out."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from .checkpoint_file import read_checkpoint


@contextlib.contextmanager
def consolidated(ckpt_path: str | Path) -> Iterator[str]:
    """A single-file checkpoint for `ckpt_path`: the file itself, or, for the folder of a sharded
    checkpoint, its shards gathered into one full state dict in a temporary file (needs CPU memory for
    the whole model; optimizer states are left out)."""
    path = Path(ckpt_path)
    if not path.is_dir():
        yield str(path)
        return
    if (path / "latest").is_file() or (path / "checkpoint").is_dir():  # DeepSpeed
        from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / f"{path.name}.consolidated.ckpt"
            convert_zero_checkpoint_to_fp32_state_dict(str(path), str(out))
            yield str(out)
        return
    if not (path / ".metadata").is_file():
        raise ValueError(
            f"{path} is a folder but not a sharded checkpoint (no torch.distributed.checkpoint `.metadata`, "
            "no DeepSpeed `latest`); pass a .ckpt file or the checkpoint folder a sharded run wrote"
        )
    # Lightning keeps everything but the weights in `meta.pt` beside the shards (read first: a corrupt one
    # is named before any shard is read).
    checkpoint = read_checkpoint(path / "meta.pt", mmap=False)
    # The model weights only (no optimizer state), rebuilt from the shards' metadata in one process as
    # torch's `dcp_to_torch_save` does (with the same private helpers: the public `load` only fills
    # keys already present).
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    weights: dict = {}
    # The weights' key: "state_dict" (ModelParallelStrategy / FSDP2), "model" (FSDPStrategy / FSDP1).
    planner = _EmptyStateDictLoadPlanner(keys={"state_dict", "model"})
    _load_state_dict(weights, storage_reader=FileSystemReader(path), planner=planner, no_dist=True)
    checkpoint["state_dict"] = weights.get("state_dict", weights.get("model"))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / f"{path.name}.consolidated.ckpt"
        torch.save(checkpoint, out)
        yield str(out)
