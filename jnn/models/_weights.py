"""Reading another library's weights: a state dict (name -> array) and its config, from where they live.

A source is a file (``.safetensors``, PyTorch ``.bin`` / ``.pth`` / ``.pt``), a folder (a Hugging Face
Hub snapshot: ``model.safetensors`` or ``pytorch_model.bin``, sharded or not, with ``config.json``;
or a folder holding one weights file), or a Hub repository id such as ``"openai-community/gpt2"``
(downloaded with ``huggingface_hub`` when a network is reachable). torch, safetensors and
huggingface_hub are imported only when a file of theirs is read: ``import jnn`` stays light.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np

_SAFETENSORS, _BIN = ("model.safetensors", "model.safetensors.index.json"), ("pytorch_model.bin",
                                                                             "pytorch_model.bin.index.json")
_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")
INSTALL = 'pip install "jnn[interop]"'


@dataclasses.dataclass(frozen=True)
class StateDict:
    """Arrays by their source name, the source's config (``config.json``, or {}), and where they came from."""

    arrays: dict[str, np.ndarray]
    config: dict[str, Any]
    where: str


def read_state_dict(source: str | os.PathLike) -> StateDict:
    """The arrays and config of a weights file, a snapshot folder or a Hub repository id.

    Raises:
      ValueError: a path that does not exist and is no Hub id, a folder without one clear weights
        file, a file of another kind; ImportError: torch (for ``.bin`` / ``.pth``) or huggingface_hub
        (for a Hub id) not installed.
    """
    path = os.fspath(source)
    if not os.path.exists(path):
        path = _download(path)
    if os.path.isdir(path):
        files = _weight_files(path)
        config = _read_json(os.path.join(path, "config.json"))
    else:
        files = [path]
        config = {}
    arrays: dict[str, np.ndarray] = {}
    for f in files:
        arrays.update(_read_file(f))
    return StateDict(arrays, config, path)


def _weight_files(folder: str) -> list[str]:
    for single, index in (_SAFETENSORS, _BIN):
        if os.path.isfile(os.path.join(folder, index)):  # a sharded checkpoint: the index names the shards
            shards = sorted(set(_read_json(os.path.join(folder, index))["weight_map"].values()))
            return [os.path.join(folder, s) for s in shards]
        if os.path.isfile(os.path.join(folder, single)):
            return [os.path.join(folder, single)]
    candidates = sorted(f for f in os.listdir(folder) if f.endswith(_SUFFIXES))
    if len(candidates) == 1:
        return [os.path.join(folder, candidates[0])]
    raise ValueError(f"from_pretrained: cannot tell which weights to read in {folder!r}; expected a Hugging Face "
                     f"snapshot ({_SAFETENSORS[0]} or {_BIN[0]}, sharded with an index or not) or exactly one "
                     f"{'/'.join(_SUFFIXES)} file, found {candidates or 'none'}. Fix: pass the file itself.")


def _read_json(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _read_file(path: str) -> dict[str, np.ndarray]:
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        # "flax" reads every dtype, bfloat16 included (numpy has none); the arrays become numpy below.
        with safe_open(path, framework="flax") as f:
            return {k: np.asarray(f.get_tensor(k)) for k in f.keys()}
    if path.endswith((".bin", ".pth", ".pt")):
        return _read_torch(path)
    raise ValueError(f"from_pretrained: cannot read {path!r}; expected a {', '.join(_SUFFIXES)} file or a folder.")


def _read_torch(path: str) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as err:
        raise ImportError(f"from_pretrained: reading the PyTorch file {path!r} needs torch. Fix: {INSTALL}, or "
                          f"save the weights as safetensors (safetensors.torch.save_file).") from err
    # weights_only: tensors and plain containers, never arbitrary pickled code.
    obj = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "model_state_dict"):  # training checkpoints wrap the weights
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise ValueError(f"from_pretrained: {path!r} holds a {type(obj).__name__}, not a state dict; expected "
                         f"what torch.save(model.state_dict(), path) writes. Fix: save the state dict, not the model.")
    out = {}
    for k, t in obj.items():
        if isinstance(t, torch.Tensor):
            t = t.detach().cpu()
            out[k] = (t.float() if t.dtype == torch.bfloat16 else t).numpy()
    return out


def _download(name: str) -> str:
    """A Hub repository's snapshot folder (weights as safetensors where the repository has them)."""
    if name.count("/") != 1 or name.startswith((".", "/")):
        raise ValueError(f"from_pretrained: {name!r} is neither a file, a folder nor a Hub repository id "
                         f"(\"owner/name\"). Fix: pass the path of the downloaded weights.")
    try:
        import huggingface_hub
    except ImportError as err:
        raise ImportError(f"from_pretrained: downloading {name!r} from the Hugging Face Hub needs huggingface_hub. "
                          f"Fix: {INSTALL}, or download the files and pass their folder.") from err
    try:
        folder = huggingface_hub.snapshot_download(name, allow_patterns=["config.json", "model.safetensors*"])
        if not any(f.endswith(".safetensors") for f in os.listdir(folder)):  # an older repository: .bin only
            folder = huggingface_hub.snapshot_download(name, allow_patterns=["config.json", "pytorch_model.bin*"])
        return folder
    except Exception as err:  # noqa: BLE001 - no network, unknown repository, gated: one message
        raise ValueError(f"from_pretrained: could not download {name!r} from the Hugging Face Hub "
                         f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). Fix: download "
                         f"the repository where a network is reachable (huggingface-cli download {name}) and pass "
                         f"its folder.") from err


__all__ = ["StateDict", "read_state_dict"]
