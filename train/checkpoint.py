"""Training checkpoints: written atomically, verified on load, with everything an exact resume needs.

A checkpoint is a ``torch.save`` file (loadable with ``torch.load(path, weights_only=True)``) holding
plain containers and CPU tensors: ``model``, ``optimizer``, ``scheduler``, ``ema`` state dicts, the
position (``epoch``, ``step_in_epoch``, ``global_step``), the RNG states of every rank, the torch
thread count, the metric history and the run's arguments, plus a SHA-256 over all of it. The file
is written to a temporary name in the same folder (``.last.pth.tmp<pid>``) and renamed over the old
one (``os.replace``), so a kill leaves either the previous checkpoint or the new one, never half a
file; a file damaged later fails the digest check. Resuming, evaluating and ``--initial-checkpoint``
all load through :func:`load_checkpoint`.

timm's ``CheckpointSaver`` keeps no scheduler, RNG or mid-epoch position, so it cannot resume
exactly; its ``unwrap_model`` / ``clean_state_dict`` are used for the model weights.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import random
from typing import Any, Dict, List

import numpy as np
import torch

from .rundir import write_atomic

FORMAT = "butterfly-train/1"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: missing, truncated, corrupted or of another format."""


def to_cpu(obj: Any) -> Any:
    """``obj`` with every tensor moved to the CPU (containers rebuilt, other leaves kept)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def digest(obj: Any) -> str:
    """SHA-256 over a nested structure of containers, tensors and plain values (order matters)."""
    h = hashlib.sha256()

    def feed(o: Any) -> None:
        if isinstance(o, torch.Tensor):
            t = o.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy())
        elif isinstance(o, dict):
            h.update(f"D{len(o)}".encode())
            for k, v in o.items():
                feed(k)
                feed(v)
        elif isinstance(o, (list, tuple)):
            h.update(f"L{len(o)}".encode())
            for v in o:
                feed(v)
        else:
            h.update(f"V{type(o).__name__}:{o!r};".encode())

    feed(obj)
    return h.hexdigest()


def tensor_bytes(obj: Any) -> int:
    """The bytes of the tensors in a nested structure (about what ``torch.save`` writes)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def save_checkpoint(state: Dict[str, Any], path: str) -> None:
    """Write ``state`` (tensors are copied to the CPU) to ``path`` atomically, with its digest. A
    full disk is an :class:`~train.rundir.OutputError` that says so; ``path`` keeps its previous
    content."""
    state = to_cpu(dict(state, format=FORMAT))
    state["sha256"] = digest(state)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_atomic(path, lambda f: torch.save(state, f), binary=True, durable=True,
                 needed=tensor_bytes(state))


def read_file(path: str, use: str = "resumed from") -> Any:
    """``torch.load`` (CPU, ``weights_only``) with a clear error for missing or unreadable files;
    ``use`` completes "it was not ..." in the message."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path} holds Python objects besides tensors (e.g. a timm train.py checkpoint with its "
            "arguments); it was not loaded, since unpickling objects can run code. If you trust "
            "it, save its weights alone: torch.save(torch.load(path, weights_only=False)"
            "['state_dict'], 'weights.pth')") from err
    except Exception as err:
        size = os.path.getsize(path)
        raise CheckpointError(
            f"checkpoint {path} ({size} bytes) is truncated or corrupted and cannot be read "
            f"({type(err).__name__}: {str(err).split('. ')[0]}). It was not {use}; use an "
            "intact checkpoint (e.g. best.pth or a copy)") from err


def is_ours(state: Any) -> bool:
    """Whether ``state`` claims to be a checkpoint of :func:`save_checkpoint` (then it is verified)."""
    return isinstance(state, dict) and ("sha256" in state or "format" in state)


def load_checkpoint(path: str, use: str = "resumed from", plain_ok: bool = False) -> Dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` and verify its digest. With
    ``plain_ok`` a file of another kind (a ``state_dict``, timm's weights) is returned as it is."""
    state = read_file(path, use)
    if not is_ours(state):
        if plain_ok:
            return state
        raise CheckpointError(f"{path} is not a training checkpoint written by 'python -m train' "
                              f"(format {FORMAT}); load plain weights with 'python -m train.evaluate'")
    expected = state.pop("sha256", None)
    if state.get("format") != FORMAT or digest(state) != expected:
        raise CheckpointError(f"checkpoint {path} is corrupted: its content does not match the "
                              f"SHA-256 recorded when it was written. It was not {use}")
    return state


def model_weights(state: Any, ema: bool = False) -> Dict[str, torch.Tensor]:
    """The model ``state_dict`` inside a checkpoint of ours, of timm's ``train.py``, or a plain one."""
    from timm.models import clean_state_dict
    if isinstance(state, dict):
        for key in (("ema", "state_dict_ema") if ema else ("model", "state_dict")):
            if isinstance(state.get(key), dict):
                return clean_state_dict(state[key])
        if ema:
            raise CheckpointError("the checkpoint holds no EMA weights (train with --model-ema)")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError("the file holds no model weights (a state_dict of tensors)")
    return clean_state_dict(state)


def load_weights(model: torch.nn.Module, state: Any, source: str, ema: bool = False) -> None:
    """Load the weights of ``state`` (see :func:`model_weights`) into ``model``, all of them: missing,
    unexpected or differently shaped tensors give a :class:`CheckpointError` naming them."""
    weights = model_weights(state, ema)
    own = model.state_dict()
    # a BFT's layout record (_extra_state) is checked when present; older checkpoints lack it
    missing = [k for k in own if k not in weights and not k.endswith("_extra_state")]
    unexpected = [k for k in weights if k not in own]
    shapes = [f"{k} {tuple(weights[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in weights and weights[k].shape != v.shape and not k.endswith("_extra_state")]

    def few(names: List[str]) -> str:
        return ", ".join(names[:4]) + (f" (+{len(names) - 4} more)" if len(names) > 4 else "")
    problems = [f"{what}: {few(names)}" for what, names in (
        ("missing", missing), ("unexpected", unexpected), ("other shape", shapes)) if names]
    if problems:
        hint = ""
        if any(k.endswith("._extra_state") for k in unexpected):
            hint = ("; its BFT layers are dense layers of the model: the weights of a network "
                    "converted with butterfly.convert load with --model <the dense model> "
                    "--convert")
        raise CheckpointError(f"{source} does not fit the model ({'; '.join(problems)}); check "
                              f"--model, the dataset's number of classes and --small-input{hint}")
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:   # e.g. a BFT of another layout (see butterfly.BFT's extra state)
        raise CheckpointError(f"{source} does not fit the model: {err}") from err


# ------------------------------------------------------------------------------------ RNG states
def rng_state() -> Dict[str, Any]:
    """Every global RNG this process draws from, as plain containers and tensors."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_args(args) -> Dict[str, Any]:
    """The run's arguments as plain values (what is stored, and reused by --resume/evaluate)."""
    skip = {"resume", "resume_state", "initial_state", "stop_after_steps", "print_digest", "output",
            "overwrite", "extend"}
    return {k: v for k, v in vars(args).items() if k not in skip}


def list_ranks(values: List[Any], world: int) -> List[Any]:
    if len(values) != world:
        raise CheckpointError(f"the checkpoint was written by {len(values)} processes; resume it "
                              f"with the same number (got {world}) to continue exactly")
    return values
