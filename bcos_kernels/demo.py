"""``python -m bcos_kernels.demo``: train a small B-cos network, convert it, check it, time it, explain it.

What it does, in order:

1. Builds a small B-cos CNN the way the `bcos` package builds its models: ``BcosConv2d`` (b=2) each followed by
   an uncentered batch norm without bias, average pooling, a 1x1 B-cos conv classifier, global average pooling
   and a ``LogitLayer`` (logit bias -log(K-1)), on 6-channel [x, 1-x] inputs. The layers are the ORIGINAL
   `bcos` package's when it is installed; otherwise our exact references (``backend="torch"``), and the output
   says so.
2. ``bcos_kernels.convert`` swaps the B-cos layers of a deep copy for our fused ones, and that copy is trained
   for a few seconds on a synthetic task where the right explanation is known: "what colour is the disc?", with
   a hollow square of another colour as a distractor on a textured background. Training the converted copy
   shows that training through our kernels works (forward and hand-written backward); the trained weights are
   then loaded into the original model (same state_dict keys), so both hold the same network.
3. Parity: outputs and input gradients of the original and the converted model (eval and training mode), and
   the explanations of ``model.explain()`` against the batched ``bcos_kernels.explain``. Exit status 1 when an
   error is above the fp32 tolerance (1e-4 relative to the largest magnitude).
4. Speed: original vs converted (and, where available, with the batch norms folded into the convs), forward
   and forward+backward, and the per-image ``model.explain()`` loop vs one batched ``bcos_kernels.explain``;
   medians of interleaved repeats.
5. PNGs in ``--out``: each example's input, its explanation composited over black and over white (as the
   B-cos papers show them) and its contribution map (red positive, blue negative).
"""
from __future__ import annotations

import argparse
import copy
import importlib
import importlib.util
import math
import os
import statistics
import sys
import time
import types
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import bcos_kernels
from bcos_kernels import _png

TOLERANCE = 1e-4  # fp32 contract of DESIGN.md section 4, relative to the largest magnitude

# Class colours (RGB in [0, 1]); the class of an image is the colour of its disc.
CLASSES = ("red", "green", "blue", "yellow")
COLOURS = torch.tensor([[0.90, 0.12, 0.10],
                        [0.10, 0.72, 0.15],
                        [0.15, 0.30, 0.95],
                        [0.95, 0.85, 0.10]])


# --------------------------------------------------------------------------------------------- original layers

def import_bcos_modules() -> Optional[types.ModuleType]:
    """The `bcos` package's ``bcos.modules`` (layers, norms, LogitLayer; ``BcosUtilMixin`` in ``bcos.common``),
    or None when `bcos` is not installed.

    `bcos/__init__.py` imports torchvision (data presets) and every model, none of which the layers need, and
    torchvision has no build for every torch. So unless `bcos` is already imported, a bare package named `bcos`
    whose ``__path__`` is the installed folder is registered first: its submodules then import as usual without
    running ``bcos/__init__.py``. Likewise a bare ``bcos.models``, so that a later ``import bcos.models.vgg``
    in the same process skips ``bcos/models/__init__.py`` (every model, torchvision again) too.
    """
    if "bcos" not in sys.modules:
        spec = importlib.util.find_spec("bcos")
        if spec is None or not spec.submodule_search_locations:
            return None
        root = spec.submodule_search_locations[0]
        for name, path in (("bcos", root), ("bcos.models", os.path.join(root, "models"))):
            package = types.ModuleType(name)
            package.__path__ = [path]
            sys.modules[name] = package
    return importlib.import_module("bcos.modules")


@dataclass
class LayerKit:
    """The layer classes a model is built from, and what to call them in the output."""
    label: str                  # e.g. "bcos 0.1.3 (original)"
    conv: Callable[..., nn.Module]
    norm: Callable[[int], nn.Module]
    logit_layer: Callable[..., nn.Module]
    mixin: Optional[type]       # bcos.common.BcosUtilMixin (gives model.explain()), None without bcos
    is_original: bool


class _LogitBias(nn.Module):
    """Stand-in for ``bcos.modules.LogitLayer`` when `bcos` is missing: adds a constant logit bias."""

    def __init__(self, logit_bias: float):
        super().__init__()
        self.logit_bias = logit_bias

    def forward(self, x):
        return x + self.logit_bias


def layer_kit() -> LayerKit:
    """The original `bcos` layers when installed, else our exact references."""
    modules = import_bcos_modules()
    if modules is not None:
        from importlib.metadata import PackageNotFoundError, version
        try:
            label = f"bcos {version('bcos')} (original)"
        except PackageNotFoundError:
            label = "bcos (original)"
        from bcos.common import BcosUtilMixin
        return LayerKit(label, modules.BcosConv2d, modules.norms.NoBias(modules.norms.BatchNormUncentered2d),
                        lambda logit_bias: modules.LogitLayer(logit_bias=logit_bias), BcosUtilMixin, True)
    return LayerKit("bcos_kernels reference (bcos not installed)",
                    lambda *a, **k: bcos_kernels.nn.BcosConv2d(*a, backend="torch", **k),
                    lambda c: bcos_kernels.nn.BatchNormUncentered2d(c, bias=False),
                    _LogitBias, None, False)


def build_model(kit: LayerKit, num_classes: int, widths: Sequence[int], pool_after: Sequence[int]) -> nn.Module:
    """A small B-cos CNN in the style of the `bcos` package's BcosVGG: [B-cos conv 3x3, uncentered BN without
    bias] per width (no ReLU: the B-cos nonlinearity is the alignment), 2x2 average pooling after the layers in
    ``pool_after``, a 1x1 B-cos conv to the classes, global average pooling, logit bias -log(K - 1)."""
    bases = (kit.mixin, nn.Module) if kit.mixin is not None else (nn.Module,)

    class SmallBcosNet(*bases):
        def __init__(self):
            super().__init__()
            layers: List[nn.Module] = []
            channels = 6
            for i, width in enumerate(widths):
                layers += [kit.conv(channels, width, kernel_size=3, padding=1), kit.norm(width)]
                if i in pool_after:
                    layers.append(nn.AvgPool2d(2))
                channels = width
            self.features = nn.Sequential(*layers)
            self.classifier = kit.conv(channels, num_classes, kernel_size=1)
            self.logit_layer = kit.logit_layer(logit_bias=-math.log(num_classes - 1))

        def forward(self, x):
            x = self.classifier(self.features(x))
            return self.logit_layer(F.adaptive_avg_pool2d(x, 1).flatten(1))

    return SmallBcosNet()


# ------------------------------------------------------------------------------------------------------- data

def make_images(n: int, size: int, generator: torch.Generator):
    """``n`` images (6-channel [rgb, 1 - rgb], size x size) and their labels.

    Each image shows a filled disc, whose colour is the class, and a hollow square frame of another class
    colour (a distractor of about the same area: the net has to find the solid object, a colour count is not
    enough), on a low-saturation texture with pixel noise. A faithful explanation lights up the disc, in its
    colour, and not the frame or the background.
    """
    g = generator
    coarse = max(size // 8, 2)
    grey = torch.rand(n, 1, coarse, coarse, generator=g) * 0.5 + 0.25
    tint = (torch.rand(n, 3, coarse, coarse, generator=g) - 0.5) * 0.2
    img = F.interpolate(grey + tint, size=(size, size), mode="bilinear", align_corners=False)
    img = img + 0.06 * torch.randn(n, 3, size, size, generator=g)

    labels = torch.randint(0, len(CLASSES), (n,), generator=g)
    other = (labels + torch.randint(1, len(CLASSES), (n,), generator=g)) % len(CLASSES)
    centre = torch.arange(size, dtype=torch.float32) + 0.5
    yy, xx = centre[:, None], centre[None, :]
    thickness = max(1.0, round(size / 16))

    def position(radius: torch.Tensor, tries: int = 1):
        # (tries, n) candidate centres keeping the object inside the image
        room = size - 2 * radius - 2
        return tuple(radius + 1 + torch.rand(tries, n, generator=g) * room for _ in range(2))

    def shape(frame: bool, radius: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor) -> torch.Tensor:
        dx = (xx[None] - cx[:, None, None]).abs()
        dy = (yy[None] - cy[:, None, None]).abs()
        r = radius[:, None, None]
        if frame:
            return (dx <= r) & (dy <= r) & ~((dx <= r - thickness) & (dy <= r - thickness))
        return dx ** 2 + dy ** 2 <= r ** 2

    disc_radius = (torch.rand(n, generator=g) * 0.07 + 0.14) * size
    frame_radius = (torch.rand(n, generator=g) * 0.07 + 0.14) * size
    disc_x, disc_y = position(disc_radius)
    # the frame: the first of 8 candidate places clear of the disc (so the pictures read clearly), else the
    # farthest one (the disc, drawn on top, may then cover part of the frame)
    cand_x, cand_y = position(frame_radius, tries=8)
    gap = torch.hypot(cand_x - disc_x, cand_y - disc_y) - disc_radius - frame_radius * math.sqrt(2)
    pick = torch.where((gap > 1).any(0), (gap > 1).float().argmax(0), gap.argmax(0))
    frame_x, frame_y = cand_x.gather(0, pick[None])[0], cand_y.gather(0, pick[None])[0]
    disc = shape(False, disc_radius, disc_x[0], disc_y[0])
    frame = shape(True, frame_radius, frame_x, frame_y) & ~disc  # the disc lies on top
    for mask, colour in ((frame, COLOURS[other]), (disc, COLOURS[labels])):
        paint = colour[:, :, None, None] + 0.04 * torch.randn(n, 3, size, size, generator=g)
        img = torch.where(mask[:, None], paint, img)
    img = img.clamp(0, 1)
    return torch.cat([img, 1 - img], dim=1), labels


# --------------------------------------------------------------------------------------------------- training

def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, batch: int, lr: float,
          generator: torch.Generator, log: Callable[[str], None]) -> float:
    """Adam on the binary cross-entropy of one-hot targets (the B-cos v2 training loss); returns seconds."""
    model.train()
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * math.ceil(len(x) / batch)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=lr, total_steps=steps, pct_start=0.2)
    num_classes = len(CLASSES)
    start = time.perf_counter()
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=generator).to(x.device)
        total, count = 0.0, 0
        for i in range(0, len(x), batch):
            idx = order[i:i + batch]
            logits = model(x[idx])
            loss = F.binary_cross_entropy_with_logits(logits, F.one_hot(y[idx], num_classes).to(logits.dtype))
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            total += loss.item() * len(idx)
            count += len(idx)
        log(f"  epoch {epoch + 1}/{epochs}: loss {total / count:.4f}")
    return time.perf_counter() - start


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 256) -> float:
    model.eval()
    correct = sum((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum().item() for i in range(0, len(x), batch))
    return correct / len(x)


# ----------------------------------------------------------------------------------------------------- parity

def compare(name: str, ours: torch.Tensor, reference: torch.Tensor, log) -> bool:
    """Print max abs and relative (to the reference's largest magnitude) error; True if within TOLERANCE."""
    ours, reference = ours.detach().double(), reference.detach().double()
    abs_err = (ours - reference).abs().max().item()
    scale = reference.abs().max().item()
    rel = abs_err / scale if scale > 0 else abs_err
    ok = rel <= TOLERANCE and math.isfinite(rel)
    log(f"  {name:<44s} max abs err {abs_err:.2e}   rel {rel:.2e}   {'ok' if ok else 'FAILED'}")
    return ok


def input_gradient(model: nn.Module, x: torch.Tensor, weights: torch.Tensor):
    """Output and the gradient of sum(output * weights) w.r.t. the input (and the parameters' gradients)."""
    x = x.detach().clone().requires_grad_(True)
    model.zero_grad(set_to_none=True)
    out = model(x)
    (out * weights).sum().backward()
    return out.detach(), x.grad, {k: p.grad for k, p in model.named_parameters() if p.grad is not None}


def check_parity(original: nn.Module, converted: nn.Module, x: torch.Tensor, log) -> bool:
    ok = True
    weights = torch.randn(x.shape[0], len(CLASSES), generator=torch.Generator().manual_seed(1)).to(x.device)
    for mode in ("eval", "train"):
        # training mode updates the batch norms' running statistics: use copies, keep the models as they are
        a, b = copy.deepcopy(original), copy.deepcopy(converted)
        a.train(mode == "train")
        b.train(mode == "train")
        out_a, grad_a, pgrad_a = input_gradient(a, x, weights)
        out_b, grad_b, pgrad_b = input_gradient(b, x, weights)
        ok &= compare(f"{mode}: logits", out_b, out_a, log)
        ok &= compare(f"{mode}: input gradient", grad_b, grad_a, log)
        if mode == "train":
            worst = max(pgrad_a, key=lambda k: (pgrad_b[k] - pgrad_a[k]).abs().max().item() /
                        max(pgrad_a[k].abs().max().item(), 1e-30))
            ok &= compare(f"train: parameter gradients (worst: {worst})", pgrad_b[worst], pgrad_a[worst], log)
    return ok


class exact_fp32:
    """TF32 off inside (CUDA): cuDNN's convs and our Triton kernels would both round their inputs to TF32 by
    default, each differently, which is a 1e-3 effect and would drown the 1e-4 parity check. Timings keep the
    default (the same for both sides)."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        self.saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
        if self.device.type == "cuda":
            torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False

    def __exit__(self, *exc):
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = self.saved


def explain_loop(model: nn.Module, x: torch.Tensor, kit: LayerKit) -> Dict[str, object]:
    """The per-image baseline: the `bcos` package's ``model.explain()`` one image at a time (our
    ``bcos_kernels.explain`` on single images when `bcos` is missing), stacked like the batched result."""
    weights, explanations, predictions = [], [], []
    for i in range(x.shape[0]):
        if kit.mixin is not None:
            result = model.explain(x[i:i + 1].detach().clone().requires_grad_(True))
            predictions.append(result["prediction"])
            weights.append(result["dynamic_linear_weights"])
            explanations.append(result["explanation"])
        else:
            result = bcos_kernels.explain(model, x[i:i + 1])
            predictions.append(int(result["prediction"][0]))
            weights.append(result["dynamic_linear_weights"])
            explanations.append(result["explanation"][0])
    return {"prediction": torch.tensor(predictions), "dynamic_linear_weights": torch.cat(weights),
            "explanation": np.stack(explanations)}


# ------------------------------------------------------------------------------------------------------ speed

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_side_by_side(fns: Dict[str, Callable[[], object]], repeats: int, device: torch.device) -> Dict[str, float]:
    """Median seconds of each function; the repeats are interleaved (a, b, a, b, ...) so that a slow moment of
    the machine hits all of them alike. One untimed warm-up call each (caches, Triton compilation)."""
    times: Dict[str, List[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    _sync(device)
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def busy_note(device: torch.device) -> Optional[str]:
    """A warning when other processes already keep the CPU cores busy: CPU timings are then noisy (a thread of
    each parallel region waits for a core), and even GPU timings suffer from a slow host."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # not on every platform
        return None
    cores = os.cpu_count() or 1
    if load < cores - 0.5:
        return None
    return (f"  NOTE: load average {load:.1f} on {cores} CPU cores before the demo starts: other processes compete, "
            f"so the timings below are noisy"
            f"{' (OMP_NUM_THREADS=1 steadies them)' if device.type == 'cpu' and torch.get_num_threads() > 1 else ''}.")


def forward_backward(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    """What a training step costs besides the optimiser: forward and the parameters' gradients."""
    def run():
        model.zero_grad(set_to_none=True)
        model(x).sum().backward()
    return run


def forward_only(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def run():
        with torch.no_grad():
            model(x)
    return run


def backend_in_use(device: torch.device, x: torch.Tensor, requested: Optional[str]) -> str:
    """The backend our B-cos convs resolve to for ``x`` (backend= > BCOS_KERNELS_BACKEND > auto)."""
    try:
        from bcos_kernels.ops import _bcos_common
        return bcos_kernels.backends.resolve("bcos_conv2d", requested, device, _bcos_common.fused_backends(x))
    except Exception:  # an internal helper changed: say what auto would try first
        usable = bcos_kernels.available_backends(device, "bcos_conv2d")
        return next((b for b in bcos_kernels.backends.AUTO_ORDER.get(device.type, ()) if b in usable), "torch")


def speed_table(original: nn.Module, converted: nn.Module, x: torch.Tensor, kit: LayerKit, repeats: int,
                device: torch.device, log) -> List[tuple]:
    base = "original" if kit.is_original else "reference"
    rows = []
    train_a, train_b = copy.deepcopy(original).train(), copy.deepcopy(converted).train()
    eval_a, eval_b = original.eval(), converted.eval()

    t = time_side_by_side({"a": forward_only(eval_a, x), "b": forward_only(eval_b, x)}, repeats, device)
    rows.append(("forward (eval)", f"{base} model", t["a"], "converted", t["b"]))
    if hasattr(bcos_kernels, "fold_batchnorm"):
        folded = bcos_kernels.fold_batchnorm(copy.deepcopy(converted).eval(), x[:2])
        t = time_side_by_side({"a": forward_only(eval_a, x), "b": forward_only(folded, x)}, repeats, device)
        rows.append(("forward (eval)", f"{base} model", t["a"], "converted + fold_batchnorm", t["b"]))
    t = time_side_by_side({"a": forward_backward(train_a, x), "b": forward_backward(train_b, x)}, repeats, device)
    rows.append(("forward+backward (train)", f"{base} model", t["a"], "converted", t["b"]))

    loop_name = "model.explain() loop" if kit.mixin is not None else "explain() per image"
    t = time_side_by_side({"a": lambda: explain_loop(eval_a, x, kit),
                           "b": lambda: bcos_kernels.explain(eval_b, x),
                           "c": lambda: bcos_kernels.explain(eval_a, x)}, max(repeats // 2, 1), device)
    rows.append((f"explain {x.shape[0]} images", f"{base} {loop_name}", t["a"], "bcos_kernels.explain batched",
                 t["b"]))
    rows.append((f"explain {x.shape[0]} images", f"{base} {loop_name}", t["a"],
                 f"bcos_kernels.explain, {base} layers", t["c"]))
    return rows


def print_table(rows: List[tuple], log) -> None:
    header = ("what", "baseline", "ms", "ours", "ms", "speed-up")
    body = [(what, a, f"{ta * 1e3:.2f}", b, f"{tb * 1e3:.2f}", f"{ta / tb:.2f}x") for what, a, ta, b, tb in rows]
    widths = [max(len(str(r[i])) for r in [header] + body) for i in range(len(header))]
    line = "  ".join("{:<%d}" % w if i in (0, 1, 3) else "{:>%d}" % w for i, w in enumerate(widths))
    log("  " + line.format(*header))
    log("  " + "  ".join("-" * w for w in widths))
    for r in body:
        log("  " + line.format(*r))


# ----------------------------------------------------------------------------------------------------- images

def composite(rgba: np.ndarray, background: float) -> np.ndarray:
    """RGBA explanation (H, W, 4) in [0, 1] over a uniform background (0 black, 1 white) -> RGB."""
    alpha = rgba[..., 3:4]
    return rgba[..., :3] * alpha + background * (1 - alpha)


def contribution_rgb(contribution: np.ndarray, percentile: float = 99.5) -> np.ndarray:
    """Contribution map (H, W) -> RGB with matplotlib's "bwr" map, symmetric range clipped at the percentile of
    |contribution| (the `bcos` package's ``plot_contribution_map``): red positive, white 0, blue negative."""
    cutoff = float(np.percentile(np.abs(contribution), percentile)) or 1.0
    v = np.clip(contribution / cutoff, -1, 1)[..., None]
    positive = np.concatenate([np.ones_like(v), 1 - v, 1 - v], axis=-1)
    negative = np.concatenate([1 + v, 1 + v, np.ones_like(v)], axis=-1)
    return np.where(v >= 0, positive, negative)


def upscale(image: np.ndarray, factor: int) -> np.ndarray:
    return np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)


BACKGROUND, INK, GAP = 0.12, 0.92, 4  # dark page, light text, pixels between tiles
TILE = 160  # about this many pixels per picture: inputs are upscaled by a whole factor (sharp pixels)
COLUMNS = ("input", "explanation", "on white", "contribution")


def label_strip(width: int, texts: Sequence[tuple]) -> np.ndarray:
    """A strip of the page colour with each (x, text) of ``texts`` written at x: double size when every text
    fits its room (up to the next text's x) that way, else single size, clipped."""
    rooms = [(texts[i + 1][0] if i + 1 < len(texts) else width) - x - 2 for i, (x, _) in enumerate(texts)]
    scale = 2 if all(len(text) * _png.GLYPH_WIDTH * 2 <= room for (_, text), room in zip(texts, rooms)) else 1
    strip = np.full((_png.GLYPH_HEIGHT * scale + 6, width, 3), BACKGROUND, np.float32)
    for (x, text), room in zip(texts, rooms):
        mask = _png.text_mask(text, scale)[:, :max(room, 0)]
        strip[3:3 + mask.shape[0], x:x + mask.shape[1]][mask] = INK
    return strip


def panel_row(rgb_input: np.ndarray, rgba: np.ndarray, contribution: np.ndarray, factor: int) -> np.ndarray:
    """[input | explanation over black | explanation over white | contribution map], upscaled, with gaps."""
    tiles = [rgb_input, composite(rgba, 0.0), composite(rgba, 1.0), contribution_rgb(contribution)]
    tiles = [upscale(t.astype(np.float32), factor) for t in tiles]
    spacer = np.full((tiles[0].shape[0], GAP, 3), BACKGROUND, np.float32)
    parts = [spacer]
    for t in tiles:
        parts += [t, spacer]
    return np.concatenate(parts, axis=1)


def write_pngs(out_dir: str, x: torch.Tensor, y: torch.Tensor, result: Dict[str, object], count: int) -> List[str]:
    """overview.png (all examples) and example_NN_true-*_pred-*.png (one each); returns their paths."""
    factor = max(1, TILE // x.shape[-1])
    tile = x.shape[-1] * factor
    images = x[:, :3].permute(0, 2, 3, 1).detach().cpu().numpy()
    contributions = result["contribution_map"].detach().cpu().numpy()
    predictions = result["prediction"].cpu().tolist()
    width = GAP + 4 * (tile + GAP)
    header = label_strip(width, [(GAP + i * (tile + GAP), name) for i, name in enumerate(COLUMNS)])
    header = np.concatenate([header, np.full((2 * GAP, width, 3), BACKGROUND, np.float32)])  # apart from captions
    paths, blocks = [], [header]
    for i in range(min(count, x.shape[0])):
        truth, predicted = CLASSES[int(y[i])], CLASSES[predictions[i]]
        caption = label_strip(width, [(GAP, f"true: {truth}  predicted: {predicted}"
                                            + ("" if truth == predicted else "  (wrong)"))])
        block = np.concatenate([caption, panel_row(images[i], result["explanation"][i], contributions[i], factor)])
        name = f"example_{i:02d}_true-{truth}_pred-{predicted}.png"
        paths.append(_png.write_png(os.path.join(out_dir, name), _png.to_uint8(np.concatenate([header, block]))))
        blocks.append(block)
    blocks.append(np.full((GAP, width, 3), BACKGROUND, np.float32))
    paths.insert(0, _png.write_png(os.path.join(out_dir, "overview.png"), _png.to_uint8(np.concatenate(blocks))))
    return paths


# ------------------------------------------------------------------------------------------------------- main

@dataclass
class Settings:
    size: int
    widths: tuple
    pool_after: tuple
    train_images: int
    test_images: int
    epochs: int
    train_batch: int
    lr: float
    repeats: int
    examples: int


FULL = Settings(size=32, widths=(16, 32, 64, 64), pool_after=(1, 2), train_images=1536, test_images=512, epochs=2,
                train_batch=32, lr=3e-3, repeats=7, examples=8)
QUICK = Settings(size=16, widths=(8, 16, 16), pool_after=(1,), train_images=512, test_images=128, epochs=2,
                 train_batch=32, lr=3e-3, repeats=2, examples=3)


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bcos_kernels.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="./bcos_demo_out", help="folder for the PNGs (default ./bcos_demo_out)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="default: cuda if available, else cpu")
    parser.add_argument("--batch", type=int, default=32, help="batch for parity, timing and explanations")
    parser.add_argument("--backend", choices=("auto",) + bcos_kernels.backends.BACKENDS, default=None,
                        help="our backend (default: BCOS_KERNELS_BACKEND, else auto)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (for tests); every step still runs")
    args = parser.parse_args(argv)
    if args.batch < 1:
        parser.error("--batch must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available here")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    settings = QUICK if args.quick else FULL
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    def log(text: str = "") -> None:
        print(text, flush=True)

    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    kit = layer_kit()
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = f"CPU ({torch.get_num_threads()} thread{'s' if torch.get_num_threads() > 1 else ''})"
    log(f"bcos_kernels {bcos_kernels.__version__} demo on {device_name}, torch {torch.__version__}")
    busy = busy_note(device)
    if busy:
        log(busy)
    log(f"original layers: {kit.label}")
    if not kit.is_original:
        log("  NOTE: the `bcos` package is not installed, so the 'original' column below is our exact reference "
            "(bcos_kernels.nn, backend='torch'), not the bcos package's code.")

    # 1. the model, built from the original layers; 2. a converted deep copy, trained
    original = build_model(kit, len(CLASSES), settings.widths, settings.pool_after).to(device)
    model = bcos_kernels.convert(copy.deepcopy(original), backend=args.backend)
    ours = [m for m in model.modules() if isinstance(m, bcos_kernels.nn.BcosConv2d)]
    if not kit.is_original:
        # convert() leaves our own modules as they are: move the reference copy's layers off backend="torch"
        for m in ours:
            m.backend = args.backend
    log(f"model: {len(settings.widths)} B-cos conv + uncentered BN blocks {settings.widths}, 1x1 B-cos classifier, "
        f"{settings.size}x{settings.size} 6-channel inputs, {len(CLASSES)} classes {CLASSES}")
    log(f"convert(): {len(ours)} B-cos convs of a deep copy are now bcos_kernels.nn.{type(ours[0]).__name__}"
        f" (same Parameters; the original model is kept for comparison)")
    x_train, y_train = make_images(settings.train_images, settings.size, generator)
    x_test, y_test = make_images(settings.test_images, settings.size, generator)
    x_train, y_train, x_test, y_test = (t.to(device) for t in (x_train, y_train, x_test, y_test))
    x, y = (t.to(device) for t in make_images(args.batch, settings.size, generator))  # unseen in training
    used = backend_in_use(device, x, args.backend)
    log(f"backends for bcos_conv2d on {device.type}: available {bcos_kernels.available_backends(device, 'bcos_conv2d')}"
        f", in use: {used!r}")

    log()
    log(f"task: which colour is the disc? (a hollow square of another colour is a distractor)")
    log(f"training the converted model (our fused layers, forward and backward), {settings.train_images} images, "
        f"{settings.epochs} epochs, batch {settings.train_batch}, Adam + binary cross-entropy:")
    seconds = train(model, x_train, y_train, settings.epochs, settings.train_batch, settings.lr, generator, log)
    log(f"  trained in {seconds:.1f} s; test accuracy {accuracy(model, x_test, y_test):.1%} "
        f"(chance {1 / len(CLASSES):.0%})")
    # the trained weights go back into the original model: the state_dict keys are the same
    original.load_state_dict(model.state_dict())
    log("  loaded the trained state_dict into the original model (same keys)")
    original.eval()
    model.eval()

    # 3. parity
    log()
    log(f"parity, original vs converted, batch {x.shape[0]}, fp32 (tolerance {TOLERANCE:g} relative):")
    with exact_fp32(device):
        ok = check_parity(original, model, x, log)
        per_image = explain_loop(original, x, kit)
        # the classes the loop explained (its predictions): a near-tie of two logits may flip an argmax
        batched = bcos_kernels.explain(model, x, target=per_image["prediction"].to(device))
    ok &= compare("explain: dynamic linear weights", batched["dynamic_linear_weights"],
                  per_image["dynamic_linear_weights"], log)
    diff = np.abs(batched["explanation"] - per_image["explanation"])
    flips = int((batched["prediction"].cpu() != per_image["prediction"]).sum())
    log(f"  {'explain: RGBA explanation images':<44s} max abs diff {diff.max():.2e} (mean {diff.mean():.1e}); "
        f"{x.shape[0] - flips}/{x.shape[0]} same predictions")
    log("parity: " + ("OK" if ok else "FAILED"))

    # 4. speed
    log()
    log(f"speed, batch {x.shape[0]}, median of {settings.repeats} interleaved repeats, device {device_name}, "
        f"our backend {used!r}:")
    print_table(speed_table(original, model, x, kit, settings.repeats, device, log), log)

    # 5. pictures
    log()
    paths = write_pngs(args.out, x, y, batched, settings.examples)
    log(f"wrote {len(paths)} PNGs to {os.path.abspath(args.out)} (each row: input | explanation over black | "
        f"explanation over white | contribution map, red + / blue -):")
    for path in paths:
        log(f"  {path}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
