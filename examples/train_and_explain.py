"""Train a small B-cos network through bcos_kernels' fused layers, check it against the original, time it,
and draw its explanations.

    pip install 'bcos-kernels[viz]'      # matplotlib and Pillow, for the pictures
    python examples/train_and_explain.py --out bcos_demo_out

What it does, in order:

1. Builds a small B-cos CNN the way the `bcos` package builds its models: ``BcosConv2d`` (b=2) each followed by
   an uncentered batch norm without bias, average pooling, a 1x1 B-cos conv classifier, global average pooling
   and a ``LogitLayer`` (logit bias -log(K-1)), on 6-channel [x, 1-x] inputs. The layers are the ORIGINAL
   `bcos` package's when it is installed (imported without torchvision by
   ``bcos_kernels.originals.import_bcos_modules``); otherwise, or with ``--original reference``, our exact
   references (``backend="reference"``), and the output says so.
2. ``bcos_kernels.convert`` swaps the B-cos layers of a deep copy for our fused ones, and that copy is trained
   for a few seconds on a synthetic task where the right explanation is known: "what colour is the disc?", with
   a hollow square of another colour as a distractor on a textured background. Training the converted copy
   shows that training through our kernels works (forward and hand-written backward); the trained weights are
   then loaded into the original model (same state_dict keys), so both hold the same network.
3. Parity: outputs and input gradients of the original and the converted model (eval and training mode), and
   the explanations of ``model.explain()`` against the batched ``bcos_kernels.explain``. Exit status 1 when an
   error is above the fp32 tolerance (``--tolerance``, 1e-4 relative to the largest magnitude).
4. Speed: original vs converted (and with the batch norms folded into the convs), forward and
   forward+backward, and the per-image ``model.explain()`` loop vs one batched ``bcos_kernels.explain``; each
   timed by ``bcos_kernels.timing.measure`` (median and interquartile range).
5. PNGs in ``--out`` (matplotlib): each example's input, its explanation composited over black and over white
   (as the B-cos papers show them) and its contribution map (red positive, blue negative).
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import bcos_kernels
from bcos_kernels.originals import import_bcos_modules
from bcos_kernels.timing import Timing, measure

TOLERANCE = 1e-4  # fp32 contract of DESIGN.md section 4, relative to the largest magnitude

# Class colours (RGB in [0, 1]); the class of an image is the colour of its disc.
CLASSES = ("red", "green", "blue", "yellow")
COLOURS = torch.tensor([[0.90, 0.12, 0.10], [0.10, 0.72, 0.15], [0.15, 0.30, 0.95], [0.95, 0.85, 0.10]])

VIZ_HINT = (
    "this example draws its pictures with matplotlib (and Pillow), the optional 'viz' extra of "
    "bcos-kernels; install it with\n    pip install 'bcos-kernels[viz]'\n"
    "or, in a source checkout,\n    pip install matplotlib pillow"
)


def import_pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display needed), or exit saying what to install."""
    try:
        import matplotlib
        import PIL  # noqa: F401  (matplotlib writes PNGs through Pillow)

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        sys.exit(f"error: {exc}\n{VIZ_HINT}")
    return plt


# --------------------------------------------------------------------------------------------- original layers


@dataclass
class LayerKit:
    """The layer classes a model is built from, and what to call them in the output."""

    label: str  # e.g. "bcos 0.1.3 (original)"
    conv: Callable[..., nn.Module]
    norm: Callable[[int], nn.Module]
    logit_layer: Callable[..., nn.Module]
    mixin: Optional[type]  # bcos.common.BcosUtilMixin (gives model.explain()), None without bcos
    is_original: bool


class _LogitBias(nn.Module):
    """Stand-in for ``bcos.modules.LogitLayer`` when `bcos` is missing: adds a constant logit bias."""

    def __init__(self, logit_bias: float):
        super().__init__()
        self.logit_bias = logit_bias

    def forward(self, x):
        return x + self.logit_bias


def layer_kit(original: str = "auto") -> LayerKit:
    """The original `bcos` layers when installed (and ``original`` is "auto"), else our exact references."""
    modules = import_bcos_modules() if original == "auto" else None
    if modules is not None:
        from importlib.metadata import PackageNotFoundError, version

        try:
            label = f"bcos {version('bcos')} (original)"
        except PackageNotFoundError:
            label = "bcos (original)"
        from bcos.common import BcosUtilMixin

        return LayerKit(
            label,
            modules.BcosConv2d,
            modules.norms.NoBias(modules.norms.BatchNormUncentered2d),
            lambda logit_bias: modules.LogitLayer(logit_bias=logit_bias),
            BcosUtilMixin,
            True,
        )
    why = "bcos not installed" if original == "auto" else "--original reference"
    return LayerKit(
        f"bcos_kernels reference ({why})",
        lambda *a, **k: bcos_kernels.nn.BcosConv2d(*a, backend="reference", **k),
        lambda c: bcos_kernels.nn.BatchNormUncentered2d(c, bias=False),
        _LogitBias,
        None,
        False,
    )


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
        return dx**2 + dy**2 <= r**2

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


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int,
    batch: int,
    lr: float,
    generator: torch.Generator,
    log: Callable[[str], None],
) -> float:
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
            idx = order[i : i + batch]
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
    correct = sum((model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum().item() for i in range(0, len(x), batch))
    return correct / len(x)


# ----------------------------------------------------------------------------------------------------- parity


def compare(name: str, ours: torch.Tensor, reference: torch.Tensor, tolerance: float, log) -> bool:
    """Print max abs and relative (to the reference's largest magnitude) error; True if within ``tolerance``."""
    ours, reference = ours.detach().double(), reference.detach().double()
    abs_err = (ours - reference).abs().max().item()
    scale = reference.abs().max().item()
    rel = abs_err / scale if scale > 0 else abs_err
    ok = rel <= tolerance and math.isfinite(rel)
    log(f"  {name:<44s} max abs err {abs_err:.2e}   rel {rel:.2e}   {'ok' if ok else 'FAILED'}")
    return ok


def input_gradient(model: nn.Module, x: torch.Tensor, weights: torch.Tensor):
    """Output and the gradient of sum(output * weights) w.r.t. the input (and the parameters' gradients)."""
    x = x.detach().clone().requires_grad_(True)
    model.zero_grad(set_to_none=True)
    out = model(x)
    (out * weights).sum().backward()
    return out.detach(), x.grad, {k: p.grad for k, p in model.named_parameters() if p.grad is not None}


def check_parity(original: nn.Module, converted: nn.Module, x: torch.Tensor, tolerance: float, log) -> bool:
    ok = True
    weights = torch.randn(x.shape[0], len(CLASSES), generator=torch.Generator().manual_seed(1)).to(x.device)
    for mode in ("eval", "train"):
        # training mode updates the batch norms' running statistics: use copies, keep the models as they are
        a, b = copy.deepcopy(original), copy.deepcopy(converted)
        a.train(mode == "train")
        b.train(mode == "train")
        out_a, grad_a, pgrad_a = input_gradient(a, x, weights)
        out_b, grad_b, pgrad_b = input_gradient(b, x, weights)
        ok &= compare(f"{mode}: logits", out_b, out_a, tolerance, log)
        ok &= compare(f"{mode}: input gradient", grad_b, grad_a, tolerance, log)
        if mode == "train":
            worst = max(
                pgrad_a,
                key=lambda k: (pgrad_b[k] - pgrad_a[k]).abs().max().item() / max(pgrad_a[k].abs().max().item(), 1e-30),
            )
            ok &= compare(
                f"train: parameter gradients (worst: {worst})", pgrad_b[worst], pgrad_a[worst], tolerance, log
            )
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
            result = model.explain(x[i : i + 1].detach().clone().requires_grad_(True))
            predictions.append(result["prediction"])
            weights.append(result["dynamic_linear_weights"])
            explanations.append(result["explanation"])
        else:
            result = bcos_kernels.explain(model, x[i : i + 1])
            predictions.append(int(result["prediction"][0]))
            weights.append(result["dynamic_linear_weights"])
            explanations.append(result["explanation"][0])
    return {
        "prediction": torch.tensor(predictions),
        "dynamic_linear_weights": torch.cat(weights),
        "explanation": np.stack(explanations),
    }


# ------------------------------------------------------------------------------------------------------ speed


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
    return (
        f"  NOTE: load average {load:.1f} on {cores} CPU cores before the example starts: other processes "
        f"compete, so the timings below are noisy"
        f"{' (OMP_NUM_THREADS=1 steadies them)' if device.type == 'cpu' and torch.get_num_threads() > 1 else ''}."
    )


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


def backend_in_use(x: torch.Tensor, requested: Optional[str]) -> str:
    """The backend our B-cos convs resolve to for ``x`` (backend= > BCOS_KERNELS_BACKEND > auto)."""
    return bcos_kernels.backends.resolve("bcos_conv2d", requested, x)


def speed_table(
    original: nn.Module,
    converted: nn.Module,
    x: torch.Tensor,
    kit: LayerKit,
    min_run_time_s: float,
    device: torch.device,
) -> List[tuple]:
    """Rows (what, baseline, its Timing, ours, our Timing)."""
    base = "original" if kit.is_original else "reference"

    def timed(fn: Callable[[], object]) -> Timing:
        fn()  # warm-up outside the timer (Triton compilation, first-call caches)
        return measure(fn, device=device, min_run_time_s=min_run_time_s)

    train_a, train_b = copy.deepcopy(original).train(), copy.deepcopy(converted).train()
    eval_a, eval_b = original.eval(), converted.eval()
    folded = bcos_kernels.fold_batchnorm(copy.deepcopy(converted).eval(), x[:2])
    t_eval = timed(forward_only(eval_a, x))
    rows = [
        ("forward (eval)", f"{base} model", t_eval, "converted", timed(forward_only(eval_b, x))),
        ("forward (eval)", f"{base} model", t_eval, "converted + fold_batchnorm", timed(forward_only(folded, x))),
        (
            "forward+backward (train)",
            f"{base} model",
            timed(forward_backward(train_a, x)),
            "converted",
            timed(forward_backward(train_b, x)),
        ),
    ]
    loop_name = "model.explain() loop" if kit.mixin is not None else "explain() per image"
    t_loop = timed(lambda: explain_loop(eval_a, x, kit))
    what = f"explain {x.shape[0]} images"
    rows.append(
        (
            what,
            f"{base} {loop_name}",
            t_loop,
            "bcos_kernels.explain batched",
            timed(lambda: bcos_kernels.explain(eval_b, x)),
        )
    )
    rows.append(
        (
            what,
            f"{base} {loop_name}",
            t_loop,
            f"bcos_kernels.explain, {base} layers",
            timed(lambda: bcos_kernels.explain(eval_a, x)),
        )
    )
    return rows


def print_table(rows: List[tuple], log) -> None:
    def ms(t: Timing) -> str:
        return f"{t.median_ms:.2f} ±{t.iqr_ms:.2f}"

    header = ("what", "baseline", "ms (±IQR)", "ours", "ms (±IQR)", "speed-up")
    body = [(what, a, ms(ta), b, ms(tb), f"{ta.median_ms / tb.median_ms:.2f}x") for what, a, ta, b, tb in rows]
    widths = [max(len(str(r[i])) for r in [header] + body) for i in range(len(header))]
    line = "  ".join("{:<%d}" % w if i in (0, 1, 3) else "{:>%d}" % w for i, w in enumerate(widths))
    log("  " + line.format(*header))
    log("  " + "  ".join("-" * w for w in widths))
    for r in body:
        log("  " + line.format(*r))


# ----------------------------------------------------------------------------------------------------- images

PAGE, INK = "#1f1f1f", "#ebebeb"  # dark page, light text
COLUMNS = ("input", "explanation", "on white", "contribution\n(red +, blue -)")


def composite(rgba: np.ndarray, background: float) -> np.ndarray:
    """RGBA explanation (H, W, 4) in [0, 1] over a uniform background (0 black, 1 white) -> RGB."""
    alpha = rgba[..., 3:4]
    return rgba[..., :3] * alpha + background * (1 - alpha)


def draw(plt, rows: Sequence[tuple], path: str) -> str:
    """One PNG: a row [input | explanation over black | over white | contribution map] per (caption, input RGB,
    explanation RGBA, contribution map) of ``rows``; returns ``path``."""
    fig, axes = plt.subplots(len(rows), 4, figsize=(7.2, 1.9 * len(rows) + 0.4), squeeze=False, facecolor=PAGE)
    for r, (caption, image, rgba, contribution) in enumerate(rows):
        # symmetric range clipped at the 99.5th percentile of |contribution|, like bcos's plot_contribution_map
        cutoff = float(np.percentile(np.abs(contribution), 99.5)) or 1.0
        panels = [
            (image, {}),
            (composite(rgba, 0.0), {}),
            (composite(rgba, 1.0), {}),
            (contribution, dict(cmap="bwr", vmin=-cutoff, vmax=cutoff)),
        ]
        for c, (ax, (data, style)) in enumerate(zip(axes[r], panels)):
            ax.imshow(np.clip(data, 0, 1) if not style else data, interpolation="nearest", **style)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(COLUMNS[c], color=INK, fontsize=9)
        axes[r, 0].set_ylabel(caption, color=INK, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100, facecolor=PAGE)
    plt.close(fig)
    return path


def write_pngs(plt, out_dir: str, x: torch.Tensor, y: torch.Tensor, result: Dict[str, object], count: int) -> List[str]:
    """overview.png (all examples) and example_NN_true-*_pred-*.png (one each); returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    images = x[:, :3].permute(0, 2, 3, 1).detach().cpu().numpy()
    contributions = result["contribution_map"].detach().cpu().numpy()
    predictions = result["prediction"].cpu().tolist()
    paths, rows = [], []
    for i in range(min(count, x.shape[0])):
        truth, predicted = CLASSES[int(y[i])], CLASSES[predictions[i]]
        caption = f"true: {truth}\npredicted: {predicted}" + ("" if truth == predicted else "\n(wrong)")
        rows.append((caption, images[i], result["explanation"][i], contributions[i]))
        name = f"example_{i:02d}_true-{truth}_pred-{predicted}.png"
        paths.append(draw(plt, rows[-1:], os.path.join(out_dir, name)))
    paths.insert(0, draw(plt, rows, os.path.join(out_dir, "overview.png")))
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
    min_run_time_s: float  # per timed function (bcos_kernels.timing.measure)
    examples: int


FULL = Settings(
    size=32,
    widths=(16, 32, 64, 64),
    pool_after=(1, 2),
    train_images=1536,
    test_images=512,
    epochs=2,
    train_batch=32,
    lr=3e-3,
    min_run_time_s=0.2,
    examples=8,
)
QUICK = Settings(
    size=16,
    widths=(8, 16, 16),
    pool_after=(1,),
    train_images=512,
    test_images=128,
    epochs=4,
    train_batch=32,
    lr=3e-3,
    min_run_time_s=0.02,
    examples=3,
)


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python examples/train_and_explain.py", description=__doc__.split("\n\n")[0].replace("\n", " ")
    )
    parser.add_argument("--out", default="./bcos_demo_out", help="folder for the PNGs (default ./bcos_demo_out)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--batch", type=int, default=32, help="batch for parity, timing and explanations")
    parser.add_argument(
        "--backend",
        choices=("auto",) + tuple(bcos_kernels.backends.BACKENDS),
        default=None,
        help="our backend (default: BCOS_KERNELS_BACKEND, else auto)",
    )
    parser.add_argument(
        "--original",
        choices=("auto", "reference"),
        default="auto",
        help="the layers to compare with: auto = the bcos package's when installed, else our "
        "exact references; reference = our exact references even when bcos is installed",
    )
    parser.add_argument(
        "--tolerance",
        type=float,
        default=TOLERANCE,
        help=f"parity tolerance, relative to the largest magnitude (default {TOLERANCE:g})",
    )
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
    plt = import_pyplot()  # before training: a missing extra should fail in a second, not after a minute
    settings = QUICK if args.quick else FULL
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    def log(text: str = "") -> None:
        print(text, flush=True)

    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    kit = layer_kit(args.original)
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = f"CPU ({torch.get_num_threads()} thread{'s' if torch.get_num_threads() > 1 else ''})"
    log(f"bcos_kernels {bcos_kernels.__version__} example on {device_name}, torch {torch.__version__}")
    busy = busy_note(device)
    if busy:
        log(busy)
    log(f"original layers: {kit.label}")
    if not kit.is_original:
        log(
            "  NOTE: the 'original' column below is our exact reference (bcos_kernels.nn, backend='reference'), "
            "not the bcos package's code."
        )

    # 1. the model, built from the original layers; 2. a converted deep copy, trained
    original = build_model(kit, len(CLASSES), settings.widths, settings.pool_after).to(device)
    model = bcos_kernels.convert(copy.deepcopy(original), backend=args.backend)
    ours = [m for m in model.modules() if isinstance(m, bcos_kernels.nn.BcosConv2d)]
    if not kit.is_original:
        # convert() leaves our own modules as they are: move the reference copy's layers off backend="reference"
        for m in ours:
            m.backend = args.backend
    log(
        f"model: {len(settings.widths)} B-cos conv + uncentered BN blocks {settings.widths}, 1x1 B-cos classifier, "
        f"{settings.size}x{settings.size} 6-channel inputs, {len(CLASSES)} classes {CLASSES}"
    )
    log(
        f"convert(): {len(ours)} B-cos convs of a deep copy are now bcos_kernels.nn.{type(ours[0]).__name__}"
        f" (same Parameters; the original model is kept for comparison)"
    )
    x_train, y_train = make_images(settings.train_images, settings.size, generator)
    x_test, y_test = make_images(settings.test_images, settings.size, generator)
    x_train, y_train, x_test, y_test = (t.to(device) for t in (x_train, y_train, x_test, y_test))
    x, y = (t.to(device) for t in make_images(args.batch, settings.size, generator))  # unseen in training
    used = backend_in_use(x, args.backend)
    log(
        f"backends for bcos_conv2d on {device.type}: available {bcos_kernels.available_backends(device, 'bcos_conv2d')}"
        f", in use: {used!r}"
    )

    log()
    log("task: which colour is the disc? (a hollow square of another colour is a distractor)")
    log(
        f"training the converted model (our fused layers, forward and backward), {settings.train_images} images, "
        f"{settings.epochs} epochs, batch {settings.train_batch}, Adam + binary cross-entropy:"
    )
    seconds = train(model, x_train, y_train, settings.epochs, settings.train_batch, settings.lr, generator, log)
    log(
        f"  trained in {seconds:.1f} s; test accuracy {accuracy(model, x_test, y_test):.1%} "
        f"(chance {1 / len(CLASSES):.0%})"
    )
    # the trained weights go back into the original model: the state_dict keys are the same
    original.load_state_dict(model.state_dict())
    log("  loaded the trained state_dict into the original model (same keys)")
    original.eval()
    model.eval()

    # 3. parity
    log()
    log(f"parity, original vs converted, batch {x.shape[0]}, fp32 (tolerance {args.tolerance:g} relative):")
    with exact_fp32(device):
        ok = check_parity(original, model, x, args.tolerance, log)
        per_image = explain_loop(original, x, kit)
        # the classes the loop explained (its predictions): a near-tie of two logits may flip an argmax
        batched = bcos_kernels.explain(model, x, target=per_image["prediction"].to(device))
    ok &= compare(
        "explain: dynamic linear weights",
        batched["dynamic_linear_weights"],
        per_image["dynamic_linear_weights"],
        args.tolerance,
        log,
    )
    diff = np.abs(batched["explanation"] - per_image["explanation"])
    flips = int((batched["prediction"].cpu() != per_image["prediction"]).sum())
    log(
        f"  {'explain: RGBA explanation images':<44s} max abs diff {diff.max():.2e} (mean {diff.mean():.1e}); "
        f"{x.shape[0] - flips}/{x.shape[0]} same predictions"
    )
    log("parity: " + ("OK" if ok else "FAILED"))

    # 4. speed
    log()
    log(
        f"speed, batch {x.shape[0]}, median and interquartile range of bcos_kernels.timing.measure "
        f"(about {settings.min_run_time_s:g} s each), device {device_name}, our backend {used!r}:"
    )
    print_table(speed_table(original, model, x, kit, settings.min_run_time_s, device), log)

    # 5. pictures
    log()
    paths = write_pngs(plt, args.out, x, y, batched, settings.examples)
    log(
        f"wrote {len(paths)} PNGs to {os.path.abspath(args.out)} (each row: input | explanation over black | "
        f"explanation over white | contribution map, red + / blue -):"
    )
    for path in paths:
        log(f"  {path}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
