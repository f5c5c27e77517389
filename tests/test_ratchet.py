"""scripts/ratchet.py end to end on a tiny training state: a session that improves the held-out metric
moves the state, the bundle and the model card; one that does not leaves them; both log themselves."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from svnr_fast.app import checkpoint, imageio, models
from svnr_fast.app.cli import train

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]


def load_script():
    spec = importlib.util.spec_from_file_location("ratchet", ROOT / "scripts" / "ratchet.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def workspace(tmp_path):
    data = tmp_path / "photos"
    g = torch.Generator().manual_seed(0)
    for split, count in (("train", 2), ("heldout", 1)):
        (data / split).mkdir(parents=True)
        for i in range(count):
            coarse = torch.rand(1, 3, 9, 9, generator=g)
            image = torch.nn.functional.interpolate(coarse, size=(32, 32), mode="bilinear", align_corners=False)[0]
            imageio.write_image(data / split / f"{i}.png", image)
    run = tmp_path / "first"
    assert train.main(["--data", str(data), "--out", str(run), "--preset", "tiny", "--steps", "2", "--batch-size", "2",
                       "--crop", "16", "--time-map", "observed", "--eval-every", "0", "--workers", "0",
                       "--no-progress", "--device", "cpu"]) == 0
    state = tmp_path / "state.safetensors"
    checkpoint.compact_checkpoint(run / "checkpoint.safetensors", state)
    card = tmp_path / "card.md"
    card.write_text("# tiny\n\nA model card.\n")
    return {"data": data, "state": state, "card": card, "bundle": tmp_path / "bundle.safetensors",
            "log": tmp_path / "log.jsonl", "root": tmp_path}


def ratchet(script, workspace, work: str):
    return script.main(["--data", str(workspace["data"]), "--work", str(workspace["root"] / work), "--steps", "3",
                        "--warmup-steps", "1", "--eval-crop", "32", *(f"--{k}={workspace[k]}" for k in
                                                                      ("state", "bundle", "card", "log")),
                        "--", "--batch-size", "2", "--eval-every", "0", "--workers", "0"])


def test_sessions_move_the_state_only_when_the_heldout_metric_improves(workspace, monkeypatch):
    script = load_script()
    metrics = iter([20.0, 21.5, 21.5, 21.0])     # session 1: 20.0 -> 21.5 (improved); session 2: 21.5 -> 21.0
    monkeypatch.setattr(script, "heldout_metric", lambda model, crops, device: next(metrics))

    assert ratchet(script, workspace, "session1") == 0
    state_after_first = workspace["state"].read_bytes()
    config, steps = script.state_record(workspace["state"])
    assert steps == 5 and config["preset"] == "tiny" and config["time_map"] == "observed"
    bundled = checkpoint.load_model(workspace["bundle"])
    ema = script.ema_model(workspace["state"], "cpu")
    for a, b in zip(bundled.state_dict().values(), ema.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-6)        # the state's EMA, in float16
    assert "| 3 | 5 | 20.00 | 21.50 |" in workspace["card"].read_text()
    bundle_after_first = workspace["bundle"].read_bytes()

    assert ratchet(script, workspace, "session2") == 0
    assert workspace["state"].read_bytes() == state_after_first
    assert workspace["bundle"].read_bytes() == bundle_after_first
    assert workspace["card"].read_text().count("| 3 |") == 1
    records = [json.loads(line) for line in workspace["log"].read_text().splitlines()]
    sessions = [r for r in records if "improved" in r]
    assert [(r["steps_before"], r["steps_after"], r["improved"]) for r in sessions] == [(2, 5, True), (5, 8, False)]
    assert sum("loss" in r for r in records) >= 2       # each session's training log follows its record
    assert "--init" in sessions[0]["command"] and "--seed 2" in sessions[0]["command"]


def test_heldout_metric_is_deterministic_and_sees_the_weights(workspace):
    script = load_script()
    crops = script.heldout_crops(workspace["data"], 32)
    model = script.ema_model(workspace["state"], "cpu")
    first = script.heldout_metric(model, crops, "cpu")
    assert script.heldout_metric(model, crops, "cpu") == first
    blank = models.SVNRUNet(models.preset("tiny")).eval()     # outputs 0.5 + c_skip (x - 0.5): shrinks toward grey
    assert script.heldout_metric(blank, crops, "cpu") != first
