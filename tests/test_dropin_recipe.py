"""README's "Using svnr_fast in an existing SVNR codebase": its code blocks run as written, in order, in one
namespace, and each "after" computes its "before"."""
import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = "## Using svnr_fast in an existing SVNR codebase"


def recipe_blocks() -> list[str]:
    text = README.read_text()
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    return re.findall(r"```python\n(.*?)```", text[start:end if end >= 0 else None], flags=re.S)


@pytest.fixture(scope="module")
def recipe() -> dict:
    namespace: dict = {"__name__": "readme_recipe"}
    blocks = recipe_blocks()
    assert len(blocks) >= 9, "the README section lost its code blocks"
    for number, block in enumerate(blocks):
        exec(compile(block, f"README.md recipe block {number}", "exec"), namespace)
    return namespace


def test_time_lookup(recipe):
    torch.testing.assert_close(recipe["t_after"], recipe["t_before"], rtol=0, atol=1e-9)


def test_training_sample(recipe):
    for name, after, before in zip(("y", "x_t", "tau", "target"), recipe["after"], recipe["before"]):
        torch.testing.assert_close(after, before, rtol=0, atol=1e-9 if name == "tau" else 1e-12, msg=name)
    assert recipe["after"].tau.shape == recipe["x0"].shape   # one time map per channel


def test_reverse_loop(recipe):
    torch.testing.assert_close(recipe["x_after"], recipe["x_before"], rtol=0, atol=1e-12)
    torch.testing.assert_close(recipe["x_diffusers"], recipe["x_before"], rtol=0, atol=1e-12)
    assert recipe["plan"].steps > 5                         # the loop ran for more than a few steps


def test_film(recipe):
    torch.testing.assert_close(recipe["film_after"], recipe["film_before"], rtol=1e-5, atol=1e-5)
    recipe["film_after"].sum().backward()                   # trains: gradients reach the tabulated time path
    assert recipe["to_film"][0].weight.grad.abs().sum() > 0
