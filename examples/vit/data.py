"""Datasets for the ViT example: an embedded synthetic one (no download) and CIFAR-10.

``SyntheticShapes`` draws 32x32 colour images of ten procedurally generated shape classes
(disk, square, ring, plus, stripes at two orientations, checkerboard, triangle, two dots,
diamond) at random positions, sizes, rotations and colours, with pixel noise. It is
deterministic from ``seed`` and learnable (not noise), and is built in memory in a second.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch.utils.data import Dataset, TensorDataset

CLASSES = ("disk", "square", "ring", "plus", "h-stripes", "v-stripes", "checker", "triangle", "two-dots", "diamond")
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _shape_masks(labels: torch.Tensor, gen: torch.Generator, size: int) -> torch.Tensor:
    """Boolean foreground masks [N, size, size] of each label's shape with random geometry."""
    n = labels.numel()
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size * 2 - 1  # [-1, 1]
    yy, xx = coords.view(1, size, 1), coords.view(1, 1, size)
    cx = (torch.rand(n, generator=gen) - 0.5).mul(0.6).view(n, 1, 1)
    cy = (torch.rand(n, generator=gen) - 0.5).mul(0.6).view(n, 1, 1)
    r = (0.35 + 0.3 * torch.rand(n, generator=gen)).view(n, 1, 1)
    theta = ((torch.rand(n, generator=gen) - 0.5) * (math.pi / 6)).view(n, 1, 1)  # +-15 degrees
    freq = (5.0 + 3.0 * torch.rand(n, generator=gen)).view(n, 1, 1)
    dx, dy = xx - cx, yy - cy
    u = dx * torch.cos(theta) + dy * torch.sin(theta)
    v = -dx * torch.sin(theta) + dy * torch.cos(theta)
    dist = torch.sqrt(u ** 2 + v ** 2)
    w = 0.3 * r
    candidates = torch.stack([
        dist < r,                                                          # disk
        (u.abs() < 0.8 * r) & (v.abs() < 0.8 * r),                         # square
        (dist - 0.8 * r).abs() < 0.3 * w + 0.06,                           # ring
        ((u.abs() < w) & (v.abs() < r)) | ((v.abs() < w) & (u.abs() < r)),  # plus
        torch.sin(freq * (yy * torch.cos(theta) - xx * torch.sin(theta)) * 1.6) > 0,  # horizontal stripes
        torch.sin(freq * (xx * torch.cos(theta) + yy * torch.sin(theta)) * 1.6) > 0,  # vertical stripes
        torch.sin(freq * u) * torch.sin(freq * v) > 0,                     # checkerboard
        (v < 0.6 * r) & (v > 1.7 * u.abs() - r),                           # triangle
        (torch.sqrt((u - 0.5 * r) ** 2 + v ** 2) < 0.4 * r)
        | (torch.sqrt((u + 0.5 * r) ** 2 + v ** 2) < 0.4 * r),             # two dots
        u.abs() + v.abs() < r,                                             # diamond
    ], dim=1)  # [N, 10, size, size]
    return candidates[torch.arange(n), labels]


def make_synthetic(num_samples: int, seed: int, size: int = 32, noise: float = 0.08) -> TensorDataset:
    """``num_samples`` normalised images [3, size, size] with labels in 0..9, a pure function of ``seed``."""
    if num_samples <= 0:
        raise ValueError(f"num_samples must be positive, got {num_samples}")
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, len(CLASSES), (num_samples,), generator=gen)
    masks = _shape_masks(labels, gen, size).unsqueeze(1).float()  # [N, 1, H, W]
    foreground = torch.rand(num_samples, 3, 1, 1, generator=gen)
    # Background contrasts with the foreground in brightness so every shape stays visible.
    background = (1.0 - foreground + 0.4 * (torch.rand(num_samples, 3, 1, 1, generator=gen) - 0.5)).clamp(0, 1)
    images = masks * foreground + (1 - masks) * background
    images = (images + noise * torch.randn(images.shape, generator=gen)).clamp(0, 1)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    return TensorDataset((images - mean) / std, labels)


def synthetic_splits(seed: int, train_size: int = 20_000, test_size: int = 2_000) -> tuple[Dataset, Dataset]:
    """Disjoint train and test sets (different generator streams derived from ``seed``)."""
    return make_synthetic(train_size, seed=2 * seed + 1), make_synthetic(test_size, seed=2 * seed + 2)


def cifar10_splits(data_dir: str | Path, download: bool) -> tuple[Dataset, Dataset]:
    """CIFAR-10 from ``data_dir`` (torchvision's on-disk format), downloading only if asked."""
    from torchvision import datasets, transforms

    root = Path(data_dir)
    if not download and not (root / "cifar-10-batches-py").is_dir():
        raise FileNotFoundError(
            f"CIFAR-10 not found in --data_dir {str(root)!r} (expected {root / 'cifar-10-batches-py'}); "
            "pass --download with internet access, or use --dataset synthetic")
    normalize = transforms.Normalize(MEAN, STD)
    train_tf = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                                   transforms.ToTensor(), normalize])
    test_tf = transforms.Compose([transforms.ToTensor(), normalize])
    return (datasets.CIFAR10(str(root), train=True, transform=train_tf, download=download),
            datasets.CIFAR10(str(root), train=False, transform=test_tf, download=download))
