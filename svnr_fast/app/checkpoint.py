"""Model and training-checkpoint files: safetensors with svnr_fast metadata, written atomically.

A model file holds the weights and the UNetConfig; a training checkpoint holds the model, its EMA, the
optimiser moments, the step, the best held-out metric, the RNG states of every rank and both configs.
Every file carries the SHA-256 of its own bytes, verified when it is read; NaN or infinite values are
refused; a model's config is checked against the weights in the file before the model is allocated.
"""
from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .files import atomic_write, remove_stale_temporaries
from .models import SVNRUNet, UNetConfig
from .training.config import TrainConfig, World
from .training.step import TrainState, new_state

MODEL_FORMAT = "svnr_fast.model"
CHECKPOINT_FORMAT = "svnr_fast.checkpoint"


class CheckpointError(ValueError):
    """A model or checkpoint file that is unreadable, foreign or does not fit; the message says why."""


CHECKSUM_KEY = "svnr_sha256"
_CHECKSUM = re.compile(rb'"svnr_sha256":"([0-9a-f]{64})"')


def _header(data: bytes) -> bytes:
    """The header's JSON bytes of safetensors bytes."""
    size = int.from_bytes(data[:8], "little") if len(data) >= 8 else -1
    if not 0 < size <= len(data) - 8:
        raise ValueError(f"the header length {size} does not fit a file of {len(data)} bytes")
    return data[8:8 + size]


def _checksum_span(data: bytes) -> tuple[int, int] | None:
    """Where the hex SHA-256 stored in the header sits, or None when there is not exactly one."""
    header = _header(data)
    found = list(_CHECKSUM.finditer(header))
    return (8 + found[0].start(1), 8 + found[0].end(1)) if len(found) == 1 else None


def serialise(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """safetensors bytes whose metadata carries the SHA-256 of the whole file, computed with that digest
    written as 64 zeros: every byte, the header and the metadata included, is covered."""
    from safetensors.torch import save

    data = bytearray(save({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                          metadata={**metadata, CHECKSUM_KEY: "0" * 64}))
    start, end = _checksum_span(bytes(data))
    data[start:end] = hashlib.sha256(data).hexdigest().encode()
    return bytes(data)


def _verify_checksum(data: bytes, path: Path, required: bool) -> None:
    span = _checksum_span(data)
    if span is None:
        if required:
            raise CheckpointError(f"{path} carries no checksum of its contents (written by an older svnr_fast, or "
                                  "its header is damaged), so it cannot be trusted; use a checkpoint written by "
                                  "this version")
        return
    start, end = span
    stored = data[start:end].decode()
    if hashlib.sha256(data[:start] + b"0" * 64 + data[end:]).hexdigest() != stored:
        raise CheckpointError(f"{path}: the checksum stored in the file does not match its contents: the file was "
                              "changed or damaged after it was written (a flipped byte?); use another copy or an "
                              "earlier checkpoint")


def _non_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    return sorted(name for name, t in tensors.items() if t.is_floating_point() and not bool(t.isfinite().all()))


def read_safetensors(path, expected_format: str | tuple[str, ...]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of an svnr_fast safetensors file; CheckpointError for anything else.

    The checksum svnr_fast writes into every file is verified (training checkpoints must have one; model
    files written before checksums existed, such as older bundled models, are read without), and a file
    holding NaN or infinite values is refused: a model or optimiser state is never non-finite.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no file at {path}")
    try:
        data = path.read_bytes()
        metadata = json.loads(_header(data)).get("__metadata__") or {}
        if not isinstance(metadata, dict):
            raise ValueError("the metadata is not a table")
        tensors = load(data)
    except (SafetensorError, OSError, ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupt?): {err}") from err
    found = metadata.get("format")
    formats = (expected_format,) if isinstance(expected_format, str) else expected_format
    if found not in formats:
        what = f"an {found!r} file" if found else "a safetensors file without svnr_fast metadata"
        raise CheckpointError(f"{path} is {what}, not an {' or '.join(map(repr, formats))} file; "
                              + ("pass a model saved by svnr_fast (e.g. RUN/best.safetensors)"
                                 if formats[0] == MODEL_FORMAT else "pass RUN/checkpoint.safetensors of an "
                                 "`svnr train` run"))
    _verify_checksum(data, path, required=found == CHECKPOINT_FORMAT)
    bad = _non_finite(tensors)
    if bad:
        raise CheckpointError(f"{path} holds NaN or infinite values in {', '.join(bad[:4])}"
                              f"{' ...' if len(bad) > 4 else ''}: it comes from a run that diverged or was damaged; "
                              "use an earlier checkpoint or model")
    return tensors, metadata


def config_from_metadata(metadata: dict, path) -> UNetConfig:
    try:
        return UNetConfig.from_json(metadata["model_config"])
    except (KeyError, ValueError, TypeError) as err:
        raise CheckpointError(f"{path}: the model config stored in the file is missing or invalid ({err})") from err


def check_fits(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor], path) -> None:
    """Names the weights of `state` that are missing, unexpected or of another shape than `expected`'s."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        parts = [f"{label}: {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}"
                 for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys]
        raise CheckpointError(f"{path}: the weights do not fit this model ({'; '.join(parts)})")


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], path) -> None:
    """load_state_dict that names what does not fit instead of dumping a stack trace."""
    check_fits(model.state_dict(), state, path)
    model.load_state_dict(state)


def model_for(config: UNetConfig, tensors: dict[str, torch.Tensor], path) -> SVNRUNet:
    """The model `config` describes, built only after its weights' shapes were checked against `tensors` on
    the meta device: a file whose config asks for more than it holds allocates nothing."""
    with torch.device("meta"):
        skeleton = SVNRUNet(config)
    check_fits(skeleton.state_dict(), tensors, path)
    return SVNRUNet(config)


def atomic_save(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path) -> None:
    """The safetensors file with its checksum (`serialise`), written atomically (svnr_fast.app.files)."""
    data = serialise(tensors, metadata)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda temporary: temporary.write_bytes(data))


def save_model(model: SVNRUNet, path, extra_metadata: dict[str, str] | None = None) -> None:
    """Weights + config as safetensors (atomic). `extra_metadata` (str -> str) is stored beside them."""
    metadata = {"format": MODEL_FORMAT, "model_config": model.config.to_json(), **(extra_metadata or {})}
    atomic_save(model.state_dict(), metadata, path)


def load_model(path, device="cpu") -> SVNRUNet:
    """A model saved by `save_model` (or `svnr train`'s best.safetensors), in eval mode."""
    tensors, metadata = read_safetensors(path, MODEL_FORMAT)
    model = model_for(config_from_metadata(metadata, path), tensors, path)
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
                "train_config": config.to_json(), "step": str(state.step), "prior_steps": str(state.prior_steps),
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
    remove_stale_temporaries(path)
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
    state.prior_steps = int(metadata.get("prior_steps", 0))
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


def initial_weights(path, config: UNetConfig) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None, int]:
    """What a run started with `--init PATH` begins from: (model weights, EMA weights or None, prior steps).

    A model file gives its weights (the EMA starts as their copy, and warms up as in a fresh run); a training
    checkpoint gives its model and EMA and the steps that made them, so that the new run's EMA keeps its
    full decay. Either way the new run has its own optimiser (its warm-up re-warms the moments), schedule
    and seed.
    """
    tensors, metadata = read_safetensors(path, (MODEL_FORMAT, CHECKPOINT_FORMAT))
    if config_from_metadata(metadata, path) != config:
        raise CheckpointError(f"{path}: --init model has another architecture than this run's --preset / "
                              "--parametrisation")
    if metadata["format"] == MODEL_FORMAT:
        return tensors, None, 0

    def part(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

    return part("model."), part("ema."), steps_behind(metadata, path)


def steps_behind(metadata: dict[str, str], path) -> int:
    """The training steps behind a checkpoint's weights: its own run's and those of the runs it continued."""
    try:
        return int(metadata["step"]) + int(metadata.get("prior_steps", 0))
    except (KeyError, ValueError) as err:
        raise CheckpointError(f"{path}: the step count stored in the checkpoint is missing or invalid ({err})") \
            from None


def compact_checkpoint(source, target, extra_metadata: dict[str, str] | None = None) -> None:
    """The model and EMA of a training checkpoint, without optimiser moments and RNG states: what `--init`
    continues from in a new run, at half the size (both in float32). Written atomically, with a checksum."""
    tensors, metadata, _ = read_checkpoint(source)
    kept = {k: v for k, v in tensors.items() if k.startswith(("model.", "ema."))}
    dropped = ("rng", "best_metric", CHECKSUM_KEY)
    atomic_save(kept, {**{k: v for k, v in metadata.items() if k not in dropped}, **(extra_metadata or {})}, target)
