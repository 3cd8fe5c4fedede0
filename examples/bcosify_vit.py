"""B-cosify a standard vision transformer, fine-tune it, and explain a whole batch at once.

    pip install 'bcos-kernels[viz]'      # matplotlib and Pillow, for the pictures
    python examples/bcosify_vit.py --out bcosify_vit_out

What it does, in order:

1. Trains a small standard ViT (CLIP's layout: patch conv, class token, learned positional embedding,
   ``nn.MultiheadAttention`` blocks with GELU MLPs, a final LayerNorm and linear head) on the synthetic task of
   examples/train_and_explain.py ("what colour is the disc?"), on normalised RGB images. This stands in for the
   pretrained model a user starts from.
2. ``bcos_kernels.bcosify`` turns it into a B-cos ViT in place (B = 2, biases removed; the patch conv reads the
   [x, 1 - x] encoding with its weights split as ``cat([w, -w]) / 2``, the attention runs on SDPA with its output
   projection a B-cos linear, LayerNorm and GELU become detachable). The 6-channel normalisation the original
   B-cosification applies inside its wrapper is a small module in front of it here.
3. Fine-tunes the B-cos ViT for a few steps and reports both accuracies.
4. ``bcos_kernels.explain`` explains a batch in one forward and one backward; the example checks that the
   contributions of each image sum to its explained logit (the model is dynamic linear once the additive class
   token and positional embedding are left out of the sum: they are reported as the remainder), and writes
   PNGs as the CNN example does.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_and_explain as demo  # noqa: E402  (the synthetic task and the pictures)

import bcos_kernels  # noqa: E402
from bcos_kernels.bcosify import IMAGENET_MEAN, IMAGENET_STD, bcosify  # noqa: E402


class Block(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))

    def forward(self, x):
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class SmallViT(nn.Module):
    def __init__(self, classes: int, image: int = 32, patch: int = 4, width: int = 64, depth: int = 4, heads: int = 4):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, patch, stride=patch)
        self.class_embedding = nn.Parameter(torch.zeros(width))
        self.positional_embedding = nn.Parameter(0.02 * torch.randn((image // patch) ** 2 + 1, width))
        self.blocks = nn.Sequential(*[Block(width, heads) for _ in range(depth)])
        self.ln_post = nn.LayerNorm(width)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        x = self.conv1(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + self.positional_embedding
        return self.head(self.ln_post(self.blocks(x))[:, 0])


class Normalise(nn.Module):
    """(x - mean) / std per channel: the standard model's input normalisation (3 channels), or B-cosification's
    on the [x, 1 - x] encoding (6 channels: mean (m, 1 - m), std (s, s))."""

    def __init__(self, channels: int):
        super().__init__()
        mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
        if channels == 6:
            mean, std = torch.cat([mean, 1 - mean]), torch.cat([std, std])
        self.register_buffer("mean", mean[:, None, None])
        self.register_buffer("std", std[:, None, None])

    def forward(self, x):
        return (x - self.mean) / self.std


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float, bce: bool) -> float:
    """Adam for ``steps`` steps of batch 64; returns the seconds it took. ``bce``: the B-cos models' loss
    (binary cross-entropy on one-hot targets)."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(1)
    model.train()
    start = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (64,), generator=gen)
        out = model(x[idx])
        if bce:
            loss = F.binary_cross_entropy_with_logits(out, F.one_hot(y[idx], out.shape[1]).to(out.dtype))
        else:
            loss = F.cross_entropy(out, y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return time.perf_counter() - start


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return (model(x).argmax(1) == y).float().mean().item()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few steps only (a smoke run)")
    parser.add_argument("--out", default="bcosify_vit_out", help="folder for the PNGs")
    parser.add_argument("--batch", type=int, default=8, help="images explained in one batch")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    classes = len(demo.CLASSES)
    x6, y = demo.make_images(256 if args.quick else 2048, 32, torch.Generator().manual_seed(0))
    rgb = x6[:, :3]
    steps = (20, 20) if args.quick else (200, 150)

    standard = nn.Sequential(Normalise(3), SmallViT(classes))
    seconds = train(standard, rgb, y, steps[0], 1e-3, bce=False)
    print(f"standard ViT: {steps[0]} steps in {seconds:.1f} s, accuracy {accuracy(standard, rgb, y):.2f}")

    # B-cosify the ViT (not the normalisation in front of it), then feed it the normalised 6-channel encoding
    vit = bcosify(standard[1], b=2.0)
    model = nn.Sequential(Normalise(6), vit)
    kinds = sorted({type(m).__name__ for m in vit.modules() if type(m).__module__.startswith("bcos_kernels")})
    print("B-cosified layers:", ", ".join(kinds))
    seconds = train(model, x6, y, steps[1], 5e-4, bce=True)
    print(f"B-cos ViT: fine-tuned {steps[1]} steps in {seconds:.1f} s, accuracy {accuracy(model, x6, y):.2f}")

    images, labels = x6[: args.batch], y[: args.batch]
    result = bcos_kernels.explain(model.eval(), images)
    logits = result["logits"].gather(1, result["explained_class"][:, None])[:, 0]
    total = result["contribution_map"].flatten(1).sum(1)
    print(
        "explained logit vs the sum of its contributions (the rest: class token, positional embedding and the "
        f"normalisation's mean): max |logit - sum| = {(logits - total).abs().max().item():.3g}, "
        f"max |logit| = {logits.abs().max().item():.3g}"
    )
    plt = demo.import_pyplot()
    if plt is None:
        print("matplotlib is not installed: no pictures (pip install 'bcos-kernels[viz]')")
        return 0
    paths = demo.write_pngs(plt, args.out, images, labels, result, min(3, args.batch))
    print("wrote", ", ".join(paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
