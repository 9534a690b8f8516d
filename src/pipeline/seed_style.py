"""The seed README's training loop, the benchmark's point of comparison (src/bench.py):
torchvision's MNIST dataset with per-image Resize(32)/ToTensor/Normalize through a
DataLoader, fp32, eager."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torch import nn

from pipeline.errors import PipelineError
from pipeline.measure import timed
from pipeline.mnist import RAW_FILES
from pipeline.model import resnet18


def bench_seed_style(
    raw: Path,
    device: torch.device,
    width: int,
    batch_size: int,
    workers: int,
    warmup: int,
    steps: int,
) -> float:
    """Images/s of the seed's loop: torchvision MNIST + per-image transforms + DataLoader."""
    from torchvision import datasets, transforms

    with tempfile.TemporaryDirectory() as root:
        folder = Path(root) / "MNIST" / "raw"  # the layout torchvision's MNIST expects
        folder.mkdir(parents=True)
        for name in RAW_FILES.values():
            (folder / name).symlink_to((raw / name).resolve())
        normalize = transforms.Normalize((0.1307,), (0.3081,))
        transform = transforms.Compose([transforms.Resize(32), transforms.ToTensor(), normalize])
        dataset = datasets.MNIST(root, train=True, download=False, transform=transform)
        if (warmup + steps) * batch_size > len(dataset):
            raise PipelineError(f"--warmup + --steps of {batch_size} exceed {len(dataset)} images")
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=True,
            num_workers=workers,
            drop_last=True,
            pin_memory=device.type == "cuda",
        )
        net = resnet18(width=width).to(device).train()
        optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
        batches = iter(loader)

        def step() -> None:
            x, y = next(batches)
            loss = nn.functional.cross_entropy(net(x.to(device)), y.to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

        return steps * batch_size / timed(step, warmup, steps, device)
