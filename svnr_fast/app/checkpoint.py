"""Model and training-checkpoint files: safetensors with svnr_fast metadata, written atomically.

A model file holds the weights and the UNetConfig; a training checkpoint holds the model, its EMA, the
optimiser moments, the step, the best held-out metric, the RNG states of every rank and both configs.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .models import SVNRUNet, UNetConfig
from .training.config import TrainConfig, World
from .training.step import TrainState, new_state

MODEL_FORMAT = "svnr_fast.model"


CHECKPOINT_FORMAT = "svnr_fast.checkpoint"


class CheckpointError(ValueError):
    """A model or checkpoint file that is unreadable, foreign or does not fit; the message says why."""


def read_safetensors(path, expected_format: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of an svnr_fast safetensors file; CheckpointError for anything else."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no file at {path}")
    try:
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupt?): {err}") from err
    found = metadata.get("format")
    if found != expected_format:
        what = f"an {found!r} file" if found else "a safetensors file without svnr_fast metadata"
        raise CheckpointError(f"{path} is {what}, not an {expected_format!r} file; "
                              + ("pass a model saved by svnr_fast (e.g. RUN/best.safetensors)"
                                 if expected_format == MODEL_FORMAT else "pass RUN/checkpoint.safetensors of an "
                                 "`svnr train` run"))
    return tensors, metadata


def config_from_metadata(metadata: dict, path) -> UNetConfig:
    try:
        return UNetConfig.from_json(metadata["model_config"])
    except (KeyError, ValueError, TypeError) as err:
        raise CheckpointError(f"{path}: the model config stored in the file is missing or invalid ({err})") from err


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], path) -> None:
    """load_state_dict that names what does not fit instead of dumping a stack trace."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        parts = [f"{label}: {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}"
                 for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys]
        raise CheckpointError(f"{path}: the weights do not fit this model ({'; '.join(parts)})")
    model.load_state_dict(state)


def atomic_save(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path) -> None:
    """safetensors write to a temporary file in the same folder, fsync, then rename over `path`."""
    import os

    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(temporary), metadata=metadata)
        with temporary.open("rb") as f:
            os.fsync(f.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def save_model(model: SVNRUNet, path, extra_metadata: dict[str, str] | None = None) -> None:
    """Weights + config as safetensors (atomic). `extra_metadata` (str -> str) is stored beside them."""
    metadata = {"format": MODEL_FORMAT, "model_config": model.config.to_json(), **(extra_metadata or {})}
    atomic_save(model.state_dict(), metadata, path)


def load_model(path, device="cpu") -> SVNRUNet:
    """A model saved by `save_model` (or `svnr train`'s best.safetensors), in eval mode."""
    tensors, metadata = read_safetensors(path, MODEL_FORMAT)
    model = SVNRUNet(config_from_metadata(metadata, path))
    load_weights(model, tensors, path)
    return model.to(device).eval()


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _gathered_rng_states(device: torch.device, world: World) -> list[dict]:
    local = _rng_state(device)
    if world.size == 1:
        return [local]
    states = [None] * world.size
    dist.all_gather_object(states, local)
    return states


def save_checkpoint(path, state: TrainState, config: TrainConfig, world: World = World(),
                    extra_metadata: dict[str, str] | None = None) -> None:
    """Model, EMA, optimiser, step, the RNG states of every rank and both configs, written atomically.

    Collective under DDP (every rank calls it; rank 0 writes). `extra_metadata`: more str -> str entries.
    """
    device = state.model.variance_table.device
    rng_states = _gathered_rng_states(device, world)
    if world.rank != 0:
        return
    tensors = {f"model.{k}": v for k, v in state.model.state_dict().items()}
    tensors.update({f"ema.{k}": v for k, v in state.ema.state_dict().items()})
    optimizer_state = state.optimizer.state_dict()
    for index, values in optimizer_state["state"].items():
        for key, value in values.items():
            tensors[f"optimizer.{index}.{key}"] = torch.as_tensor(value)
    rng_meta = []
    for rank, rng in enumerate(rng_states):
        tensors[f"rng.{rank}.torch"] = rng["torch"]
        if "cuda" in rng:
            tensors[f"rng.{rank}.cuda"] = rng["cuda"]
        numpy_state = rng["numpy"]
        tensors[f"rng.{rank}.numpy"] = torch.from_numpy(numpy_state[1].astype(np.int64))
        rng_meta.append({"python": [rng["python"][0], list(rng["python"][1]), rng["python"][2]],
                         "numpy": [numpy_state[0], *[v for v in numpy_state[2:]]]})
    metadata = {"format": CHECKPOINT_FORMAT, "model_config": state.model.config.to_json(),
                "train_config": config.to_json(), "step": str(state.step),
                "best_metric": json.dumps(state.best_metric), "rng": json.dumps(rng_meta),
                **(extra_metadata or {})}
    atomic_save(tensors, metadata, path)


def read_checkpoint(path) -> tuple[dict[str, torch.Tensor], dict[str, str], TrainConfig]:
    """(tensors, metadata, training config) of a checkpoint; CheckpointError for anything else."""
    tensors, metadata = read_safetensors(path, CHECKPOINT_FORMAT)
    try:
        config = TrainConfig.from_json(metadata["train_config"])
        int(metadata["step"])
    except (KeyError, ValueError, TypeError) as err:
        raise CheckpointError(f"{path}: the training state stored in the checkpoint is missing or invalid ({err})") \
            from err
    return tensors, metadata, config


def load_checkpoint(path, config: TrainConfig, device, world: World = World()) -> TrainState:
    """The training state saved at `path`, for a run with `config` (which must describe the same model)."""
    tensors, metadata, _ = read_checkpoint(path)
    saved = config_from_metadata(metadata, path)
    if saved != config.model_config():
        raise CheckpointError(f"{path} holds a different model (preset/parametrisation) than this run asks for: "
                              f"saved {saved}, asked {config.model_config()}; resume with the options it was "
                              "started with, or start a new run in another folder")
    state = new_state(config, device, world.rank)

    def part(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

    load_weights(state.model, part("model."), path)
    load_weights(state.ema, part("ema."), path)
    optimizer_state: dict = {}
    for key, value in part("optimizer.").items():
        index, name = key.split(".", 1)
        optimizer_state.setdefault(int(index), {})[name] = value
    if optimizer_state and set(optimizer_state) != set(range(len(list(state.model.parameters())))):
        raise CheckpointError(f"{path}: the optimiser state does not match the model's parameters")
    # the hyper-parameters come from this run (its device decides e.g. `fused`); the moments from the file
    state.optimizer.load_state_dict({"state": optimizer_state,
                                     "param_groups": state.optimizer.state_dict()["param_groups"]})
    state.step = int(metadata["step"])
    state.best_metric = json.loads(metadata.get("best_metric", "null"))
    rng_meta = json.loads(metadata.get("rng", "[]"))
    if world.rank < len(rng_meta):
        meta, prefix = rng_meta[world.rank], f"rng.{world.rank}."
        python = meta["python"]
        rng = {"torch": tensors[prefix + "torch"],
               "python": (python[0], tuple(python[1]), python[2]),
               "numpy": (meta["numpy"][0], tensors[prefix + "numpy"].numpy().astype(np.uint32), *meta["numpy"][1:])}
        if prefix + "cuda" in tensors:
            rng["cuda"] = tensors[prefix + "cuda"]
        _set_rng_state(rng, torch.device(device))
    return state
