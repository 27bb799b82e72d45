"""The docs' "Use a head in your own loop" snippet (docs/api.md) runs as written and trains (issues #15, #26)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

PAGE = Path(__file__).resolve().parents[1] / "docs" / "api.md"
SECTION = "## Use a head in your own loop"


def readme_snippet() -> str:
    """The first python block of the page's section, exactly as it is written there."""
    text = PAGE.read_text()
    assert SECTION in text, f"{PAGE.name} has no section {SECTION!r}"
    block = re.search(r"```python\n(.*?)```", text.split(SECTION, 1)[1], re.S)
    assert block, f"no python block under {SECTION!r}"
    return block.group(1)


def test_the_docs_training_loop_runs_and_its_loss_falls():
    snippet = readme_snippet()
    assert "from marginlab.heads import" in snippet and "MarginLoss(" in snippet
    images = torch.randn(40, 1, 28, 28, generator=torch.Generator().manual_seed(0))  # random data, 10 classes
    labels = torch.arange(40) % 10
    namespace, losses = {}, []

    def loader(steps=12):  # the user's DataLoader; records the loss the snippet computed for the previous batch
        for _ in range(steps):
            if "loss" in namespace:
                losses.append(namespace["loss"].item())
            yield images, labels
        losses.append(namespace["loss"].item())

    namespace["loader"] = loader()
    torch.manual_seed(0)
    exec(compile(snippet, str(PAGE), "exec"), namespace)
    assert len(losses) == 12 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.5 * losses[0], losses
