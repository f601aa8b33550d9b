"""Inference speed per image at the paper architecture, as a ratio to a bare backbone forward.

AnoVL Table 7 reports milliseconds per image; here every method is timed on the same random-weight
backbone (random weights run exactly as fast as trained ones), one image at a time after warm-up,
with text features already computed (they are cached per class in every method). The bare forward
is the backbone's plain image encoder on the same input.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from siad.backbones import get_backbone_spec, load_openclip
from siad.methods import Method, build_method

BARE = "bare forward"


@dataclass(frozen=True)
class Timing:
    """Milliseconds per image (mean and standard deviation over the timed images)."""

    name: str
    device: str
    mean_ms: float
    std_ms: float
    ratio: float | None = None  # mean_ms / bare forward's mean_ms


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_calls(call: Callable[[torch.Tensor], Any], images: torch.Tensor, *, warmup: int, device: str) -> list[float]:
    """Milliseconds of ``call`` on each image of ``images`` (batch of one), after ``warmup`` calls."""
    for i in range(warmup):
        call(images[i % len(images)][None])
    _sync(device)
    times = []
    for image in images:
        start = time.perf_counter()
        call(image[None])
        _sync(device)
        times.append(1000.0 * (time.perf_counter() - start))
    return times


def _summary(name: str, device: str, times: list[float]) -> Timing:
    return Timing(name, device, statistics.fmean(times), statistics.pstdev(times))


def method_call(method: Method, cls_name: str) -> Callable[[torch.Tensor], Any]:
    """Predict one image of class ``cls_name`` (text features are computed on the first call)."""

    def call(image: torch.Tensor) -> Any:
        return method.predict({"image": image, "cls_name": [cls_name], "img_path": ["speed"]})

    return call


def measure_speed(
    entries: Mapping[str, tuple[str, Mapping[str, Any]]],
    *,
    backbone: str,
    image_size: int,
    device: str = "cpu",
    n_images: int = 10,
    warmup: int = 2,
    seed: int = 0,
    cls_name: str = "bottle",
) -> list[Timing]:
    """Time the bare forward of ``backbone`` and each entry (display name → (method, params)).

    Every method is built with ``backbone`` at ``image_size`` and random weights (``random_init``).
    """
    torch.manual_seed(seed)
    images = torch.randn(n_images, 3, image_size, image_size, device=device)
    bare = load_openclip(get_backbone_spec(backbone, {"pretrained": None, "image_size": image_size}),
                         device=device, seed=seed)
    with torch.no_grad():
        timings = [_summary(BARE, device, time_calls(bare.model.encode_image, images, warmup=warmup, device=device))]
    for name, (method_name, params) in entries.items():
        method = build_method(method_name, {**params, "backbone": backbone, "image_size": image_size,
                                            "random_init": True}, device=device, seed=seed)
        timings.append(_summary(name, device, time_calls(method_call(method, cls_name), images,
                                                         warmup=warmup, device=device)))
    base = timings[0].mean_ms
    return [Timing(t.name, t.device, t.mean_ms, t.std_ms, t.mean_ms / base) for t in timings]


def render_speed(timings: list[Timing], claimed: Mapping[str, tuple[float, float]], *, header: str,
                 backbone: str, image_size: int) -> tuple[str, str]:
    """(Markdown, CSV) of the speed table; ``claimed`` maps a row name to the paper's (ms, ms std)."""
    lines = [header, "", f"### Inference time per image ({backbone} at {image_size} px, random weights, batch 1)", "",
             "| method | device | ms / image | × bare forward | paper ms (RTX 3090) |", "|---|---|---:|---:|---:|"]
    csv = ["method,device,mean_ms,std_ms,ratio_to_bare_forward,paper_ms,paper_ms_std"]
    for t in timings:
        paper = claimed.get(t.name)
        paper_text = f"{paper[0]:.1f} ± {paper[1]:.1f}" if paper else "n/a"
        lines.append(f"| {t.name} | {t.device} | {t.mean_ms:.1f} ± {t.std_ms:.1f} | {t.ratio:.2f} | {paper_text} |")
        csv.append(f"{t.name},{t.device},{t.mean_ms:.3f},{t.std_ms:.3f},{t.ratio:.4f},"
                   f"{paper[0] if paper else ''},{paper[1] if paper else ''}")
    lines += ["", "_The paper times a GPU; its ratios are relative to its CLIP row (TFA 7.6/6.2 = 1.23×, TTA "
              "20.1/6.2 = 3.2×). Here ratios are relative to a bare forward of the same backbone._"]
    csv_header = [f"# {header.lstrip('> ').strip('*')}"] if header else []
    return "\n".join(lines) + "\n", "\n".join(csv_header + csv) + "\n"


DEMO_HEADER = ("> **DEMO OUTPUT: timings of random-initialised models at the paper architecture on this machine; "
               "the synthetic data play no part here, but these are not the paper's GPU timings.**")


def run_speed(config: Mapping[str, Any], claimed_csv: str | None = None) -> tuple[str, str]:
    """The speed table of ``config['speed']`` on the CPU and, when one is visible, a GPU."""
    import pandas as pd

    from siad.config import method_params

    section = config["speed"]
    entries = {
        name: (row["method"], method_params(config, row["method"], row.get("variant", "default")))
        for name, row in section["rows"].items()
    }
    claimed: dict[str, tuple[float, float]] = {}
    if claimed_csv:
        frame = pd.read_csv(claimed_csv, comment="#")
        claimed = {str(r.method): (float(r.time_ms), float(r.time_ms_std)) for r in frame.itertuples()}
    claimed = {name: claimed[name] for name in entries if name in claimed}
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    timings = [
        t
        for device in devices
        for t in measure_speed(entries, backbone=section["backbone"], image_size=section["image_size"],
                               device=device, n_images=section.get("n_images", 10),
                               warmup=section.get("warmup", 2), seed=int(config["seed"]))
    ]
    header = DEMO_HEADER if config["demo"] else ""
    return render_speed(timings, claimed, header=header, backbone=section["backbone"],
                        image_size=section["image_size"])
