"""Batched, device-agnostic re-implementation of the BCL augmentation (SPEC section 6).

The reference runs torchvision transforms and a PIL RandAugment on one PIL image at a
time in CPU loader workers. Here every op takes a uint8 batch (N, 3, H, W) plus
per-sample parameter tensors and runs on whatever device the batch lives on, with no
loop over samples. Each op reproduces the integer arithmetic of the PIL code the
reference calls (fixed-point bicubic resampling, float32 blends that truncate, 16.16
fixed-point affine maps, PIL's HSV round trip, ...) and returns uint8, so results match
PIL pixel for pixel; tests/test_augment.py measures this op by op.

Layout, in the style of torchvision's transforms-v2 functionals:

* pure ops: ``resized_crop``, ``hflip``, ``adjust_brightness`` ... ``adjust_hue``,
  ``rgb_to_grayscale``, ``affine_nearest`` (and ``shear_x`` ... ``rotate`` on top),
  ``autocontrast``, ``invert``, ``equalize``, ``solarize``, ``posterize``,
  ``sharpness``, ``cutout``;
* random wrappers that draw every per-sample parameter up front from a caller-supplied
  ``torch.Generator`` (fixed-size draws, so a seed fixes the output);
* the entry points ``simclr_augment``, ``boosted_randaugment`` and ``to_unit_float``;
  the ``*_with_params`` variants also return the drawn parameters so that tests can
  replay them through PIL.
"""
from __future__ import annotations

import math

import torch

__all__ = [
    "simclr_augment",
    "simclr_augment_with_params",
    "boosted_randaugment",
    "boosted_randaugment_with_params",
    "to_unit_float",
    "RANDAUG_OPS",
    "resized_crop",
    "hflip",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_saturation",
    "adjust_hue",
    "rgb_to_grayscale",
    "color_jitter",
    "affine_nearest",
    "shear_x",
    "shear_y",
    "translate_x",
    "translate_y",
    "rotate",
    "autocontrast",
    "invert",
    "equalize",
    "solarize",
    "posterize",
    "sharpness",
    "cutout",
    "cutout_box",
    "draw_crop_params",
    "draw_simclr_params",
    "apply_simclr",
    "draw_randaug_params",
    "apply_randaug",
    "apply_op",
    "op_value",
]

F32, F64 = torch.float32, torch.float64

# --------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------


def _col(t: torch.Tensor) -> torch.Tensor:
    """Per-sample (N,) -> (N, 1, 1, 1) for broadcasting over images."""
    return t.reshape(-1, 1, 1, 1)


def _col3(t: torch.Tensor) -> torch.Tensor:
    """Per-sample (N,) -> (N, 1, 1) for broadcasting over per-channel lookup tables."""
    return t.reshape(-1, 1, 1)


def _to_u8(x: torch.Tensor) -> torch.Tensor:
    """Clip to [0, 255] and truncate, as PIL's (UINT8) casts after its clip tests do."""
    return x.clamp(0, 255).trunc().to(torch.uint8)


def _luma(images: torch.Tensor) -> torch.Tensor:
    """PIL's RGB -> 'L': (R*19595 + G*38470 + B*7471 + 0x8000) >> 16, as int32 (N,1,H,W)."""
    x = images.to(torch.int32)
    return (x[:, 0:1] * 19595 + x[:, 1:2] * 38470 + x[:, 2:3] * 7471 + 0x8000) >> 16


def _blend(degenerate: torch.Tensor, image: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL Image.blend(degenerate, image, factor), i.e. every ImageEnhance op.

    PIL passes the factor as a C float and computes ``in1 + alpha * (in2 - in1)`` in
    float32, then clips and truncates (no rounding); doing the same float32 ops here
    reproduces it bit for bit.
    """
    a = _col(factor.to(F64).to(F32))
    d = degenerate.to(F32)
    return _to_u8(d + a * (image.to(F32) - d))


def _div(a, b) -> torch.Tensor:
    """Correctly rounded a / b on every device. torch evaluates ``tensor / number`` as
    ``tensor * (1 / number)`` on CUDA and ``number / tensor`` as ``reciprocal(tensor) *
    number``; both can be off by one ulp, which flips PIL's truncations at exact ties."""
    ref = a if isinstance(a, torch.Tensor) else b
    if not isinstance(a, torch.Tensor):
        a = torch.full((), a, dtype=ref.dtype, device=ref.device)
    if not isinstance(b, torch.Tensor):
        b = torch.full((), b, dtype=ref.dtype, device=ref.device)
    return torch.div(a, b)


_CONSTANTS: dict = {}


def _const(values: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small constant tensor, cached per device: building one from a Python list on
    CUDA is a blocking host-to-device copy that would stall the launch queue."""
    key = (values, dtype, str(device))
    if key not in _CONSTANTS:
        _CONSTANTS[key] = torch.tensor(values, dtype=dtype, device=device)
    return _CONSTANTS[key]


def _round_half_up(x: torch.Tensor) -> torch.Tensor:
    """C round() for x >= 0 (half away from zero); x - floor(x) is exact, so ties are exact."""
    fl = torch.floor(x)
    return fl + (x - fl >= 0.5).to(x.dtype)


# --------------------------------------------------------------------------------------
# steps 1-4: random resized crop, flip, colour jitter, grayscale
# --------------------------------------------------------------------------------------

_PRECISION_BITS = 22  # PIL Resample.c: 32 - 8 - 2 fractional bits for 8-bit images


def _pil_bicubic(x: torch.Tensor) -> torch.Tensor:
    """PIL's bicubic kernel (a = -0.5; torch's own bicubic uses -0.75, hence not used)."""
    x = x.abs()
    near = ((1.5 * x - 2.5) * x) * x + 1.0  # ((a + 2) x - (a + 3)) x^2 + 1
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * -0.5  # (((x - 5) x + 8) x - 4) a
    return torch.where(x < 1.0, near, torch.where(x < 2.0, far, torch.zeros_like(x)))


def _resample_matrix(start: torch.Tensor, length: torch.Tensor, out_size: int, full: int) -> torch.Tensor:
    """Fixed-point PIL bicubic weights, (N, out_size, full), for resizing the window
    [start, start + length) of an axis of ``full`` pixels to ``out_size`` pixels.

    Mirrors PIL's precompute_coeffs + normalize_coeffs_8bpc for the cropped image:
    centre = (i + 0.5) * scale, support = 2 * max(scale, 1), taps [xmin, xmax) clipped
    to the window, weights normalised by their sum, then rounded to 22-bit fixed point.
    The taps are evaluated compactly, then scattered into a dense matrix.
    """
    dev = start.device
    length_d = length.to(F64).view(-1, 1, 1)
    scale = _div(length_d, float(out_size))
    filterscale = scale.clamp(min=1.0)
    support = 2.0 * filterscale
    ss = _div(1.0, filterscale)
    i = torch.arange(out_size, device=dev, dtype=F64).view(1, -1, 1)
    center = (i + 0.5) * scale
    xmin = torch.trunc(center - support + 0.5).clamp(min=0.0)
    xmax = torch.minimum(torch.trunc(center + support + 0.5), length_d)
    ntaps = 2 * math.ceil(2.0 * max(full / out_size, 1.0)) + 1  # PIL's ksize for the widest window
    tap = xmin + torch.arange(ntaps, device=dev, dtype=F64).view(1, 1, -1)  # (N, out, K)
    w = torch.where(tap < xmax, _pil_bicubic(((tap - center) + 0.5) * ss), 0.0)
    ww = w.sum(-1, keepdim=True)
    k = torch.where(ww != 0.0, w / ww, w) * float(1 << _PRECISION_BITS)
    k = torch.trunc(torch.where(k < 0, k - 0.5, k + 0.5))
    col = (tap.to(torch.int64) + start.view(-1, 1, 1)).clamp(max=full - 1)  # unused taps carry 0
    dense = torch.zeros(start.shape[0], out_size, full, dtype=F64, device=dev)
    return dense.scatter_add_(2, col, k)


def _fixed_to_u8(acc: torch.Tensor) -> torch.Tensor:
    """PIL's clip8 after a resampling pass: (acc + 2^21) >> 22, clipped (exact in float64)."""
    half = float(1 << (_PRECISION_BITS - 1))
    return torch.floor((acc + half) / float(1 << _PRECISION_BITS)).clamp(0, 255)


def resized_crop(
    images: torch.Tensor,
    top: torch.Tensor,
    left: torch.Tensor,
    height: torch.Tensor,
    width: torch.Tensor,
    size: int = 32,
) -> torch.Tensor:
    """PIL ``img.crop((left, top, left + width, top + height)).resize((size, size), BICUBIC)``
    per sample, as torchvision's resized_crop does on PIL images.

    Two separable passes as batched float64 matmuls (integers, so exact), horizontal
    first with the intermediate rounded to uint8 as PIL does. A pass PIL skips (no size
    change) has identity weights here, which is the same result.
    """
    n, _, h, w = images.shape
    if h == w:  # both axes' weights in one batched computation (half the kernels)
        kx, ky = _resample_matrix(torch.cat([left, top]), torch.cat([width, height]), size, w).split(n)
    else:
        kx = _resample_matrix(left, width, size, w)  # (N, size, W)
        ky = _resample_matrix(top, height, size, h)  # (N, size, H)
    x = images.to(F64)
    tmp = _fixed_to_u8(torch.matmul(x, kx.transpose(1, 2).unsqueeze(1)))  # (N, 3, H, size)
    out = _fixed_to_u8(torch.matmul(ky.unsqueeze(1), tmp))  # (N, 3, size, size)
    return out.to(torch.uint8)


def draw_crop_params(
    n: int,
    generator: torch.Generator,
    height: int = 32,
    width: int = 32,
    scale: tuple[float, float] = (0.1, 1.0),
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """torchvision RandomResizedCrop.get_params for N samples at once: all 10 tries are
    drawn per sample and the first valid one is kept; centre-crop fallback otherwise.
    Returns int64 (top, left, h, w), each (N,)."""
    dev = torch.device(device) if device is not None else generator.device
    area = float(height * width)
    u_scale = torch.rand(n, 10, generator=generator, device=dev, dtype=F64)
    u_ratio = torch.rand(n, 10, generator=generator, device=dev, dtype=F64)
    u_top = torch.rand(n, generator=generator, device=dev, dtype=F64)
    u_left = torch.rand(n, generator=generator, device=dev, dtype=F64)

    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    target_area = area * (scale[0] + (scale[1] - scale[0]) * u_scale)
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u_ratio)
    tw = torch.round(torch.sqrt(target_area * aspect))  # round half to even, like Python's round
    th = torch.round(torch.sqrt(target_area / aspect))
    valid = (tw > 0) & (tw <= width) & (th > 0) & (th <= height)
    first = valid.to(torch.int8).argmax(dim=1, keepdim=True)  # first valid try
    any_valid = valid.any(dim=1)
    cw = tw.gather(1, first).squeeze(1)
    ch = th.gather(1, first).squeeze(1)

    # fallback: central crop, aspect ratio clamped into the allowed range
    in_ratio = width / height
    if in_ratio < min(ratio):
        fw, fh = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fw, fh = int(round(height * max(ratio))), height
    else:
        fw, fh = width, height
    cw = torch.where(any_valid, cw, float(fw)).to(torch.int64)
    ch = torch.where(any_valid, ch, float(fh)).to(torch.int64)
    # randint(0, H - h + 1): floor(u * count), clamped against u*count rounding up to count
    top = torch.minimum(torch.floor(u_top * (height - ch + 1)).to(torch.int64), height - ch)
    left = torch.minimum(torch.floor(u_left * (width - cw + 1)).to(torch.int64), width - cw)
    top = torch.where(any_valid, top, (height - ch) // 2)
    left = torch.where(any_valid, left, (width - cw) // 2)
    return top, left, ch, cw


def hflip(images: torch.Tensor) -> torch.Tensor:
    return images.flip(-1)


# The ImageEnhance ops differ only in the image they blend with ("degenerate"); keeping
# the degenerates separate lets the random wrappers merge several enhance ops into one
# blend with a per-sample degenerate.


def _brightness_degenerate(images: torch.Tensor) -> torch.Tensor:
    return torch.zeros(images.shape[0], 1, 1, 1, dtype=torch.int32, device=images.device)


def _contrast_degenerate(images: torch.Tensor, luma: torch.Tensor | None = None) -> torch.Tensor:
    """Flat grey int(mean('L') + 0.5), (N, 1, 1, 1); ``luma`` if the caller has it already."""
    luma = _luma(images) if luma is None else luma
    mean = _div(luma.sum(dim=(1, 2, 3)).to(F64), float(luma[0].numel()))
    return _col(torch.floor(mean + 0.5).to(torch.int32))


def _color_degenerate(images: torch.Tensor) -> torch.Tensor:
    return _luma(images)  # (N, 1, H, W)


def _sharpness_degenerate(images: torch.Tensor) -> torch.Tensor:
    """ImageFilter.SMOOTH (3x3 kernel 1 1 1 / 1 5 1 / 1 1 1, /13, rounded; PIL leaves
    the one-pixel border unfiltered), (N, 3, H, W). No ties: acc/13 never ends in .5."""
    x = images.to(torch.int32)
    h, w = x.shape[-2:]
    rows = x[..., :, :w - 2] + x[..., :, 1:w - 1] + x[..., :, 2:]  # 3x3 box sum, separably (exact in int)
    box = rows[..., :h - 2, :] + rows[..., 1:h - 1, :] + rows[..., 2:, :]
    acc = box + 4 * x[..., 1:-1, 1:-1]  # centre weight 5
    smooth = x.clone()
    smooth[..., 1:-1, 1:-1] = torch.div(2 * acc + 13, 26, rounding_mode="floor")  # round(acc / 13)
    return smooth


def adjust_brightness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """ImageEnhance.Brightness: blend with black."""
    return _blend(_brightness_degenerate(images), images, factor)


def adjust_contrast(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """ImageEnhance.Contrast: blend with a flat grey int(mean('L') + 0.5)."""
    return _blend(_contrast_degenerate(images), images, factor)


def adjust_saturation(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """ImageEnhance.Color: blend with the 'L' greyscale image."""
    return _blend(_color_degenerate(images), images, factor)


def sharpness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """ImageEnhance.Sharpness: blend with the SMOOTH-filtered image."""
    return _blend(_sharpness_degenerate(images), images, factor)


def rgb_to_grayscale(images: torch.Tensor) -> torch.Tensor:
    """PIL convert('L') replicated to three channels (torchvision's RandomGrayscale)."""
    return _luma(images).to(torch.uint8).expand(images.shape).contiguous()


def _rgb_to_hsv(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PIL's rgb2hsv, reproducing its float/double mix; returns int64 planes (N,H,W)."""
    x = images.to(torch.int64)
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    maxc = torch.maximum(r, torch.maximum(g, b))
    minc = torch.minimum(r, torch.minimum(g, b))
    grey = maxc == minc
    cr = torch.where(grey, 1, maxc - minc).to(F32)
    s = cr / maxc.clamp(min=1).to(F32)  # float32 ops in PIL
    rc = (maxc - r).to(F32) / cr
    gc = (maxc - g).to(F32) / cr
    bc = (maxc - b).to(F32) / cr
    h_r = bc - gc
    h_g = (2.0 + rc.to(F64) - bc.to(F64)).to(F32)  # double expression stored to float
    h_b = (4.0 + gc.to(F64) - rc.to(F64)).to(F32)
    h = torch.where(r == maxc, h_r, torch.where(g == maxc, h_g, h_b))
    h = torch.fmod(_div(h.to(F64), 6.0) + 1.0, 1.0).to(F32)
    uh = torch.trunc(h.to(F64) * 255.0).clamp(0, 255).to(torch.int64)
    us = torch.trunc(s.to(F64) * 255.0).clamp(0, 255).to(torch.int64)
    zero = torch.zeros_like(uh)
    return torch.where(grey, zero, uh), torch.where(grey, zero, us), maxc


# (R, G, B) source for PIL's hsv2rgb cases i % 6, indexing the stack (v, p, q, t)
_HSV_CASES = ((0, 3, 1), (2, 0, 1), (1, 0, 3), (1, 2, 0), (3, 1, 0), (0, 1, 2))


def _hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """PIL's hsv2rgb on int planes (N,H,W), reproducing its float/double mix; -> uint8 (N,3,H,W)."""
    h6 = _div(h.to(F32).to(F64) * 6.0, 255.0)
    i = torch.floor(h6)
    f = (h6 - i).to(F32)
    fs = _div(s.to(F32).to(F64), 255.0).to(F32)
    vd = v.to(F64)
    p = _round_half_up(vd * (1.0 - fs.to(F64))).clamp(0, 255)
    q = _round_half_up(vd * (1.0 - (fs * f).to(F64))).clamp(0, 255)  # fs * f is a float product
    t = _round_half_up(vd * (1.0 - fs.to(F64) * (1.0 - f.to(F64)))).clamp(0, 255)
    cand = torch.stack([vd, p, q, t], dim=1)  # (N, 4, H, W)
    cases = _const(_HSV_CASES, torch.int64, h.device)[i.to(torch.int64) % 6]  # (N, H, W, 3)
    rgb = cand.gather(1, cases.permute(0, 3, 1, 2))
    rgb = torch.where((s == 0).unsqueeze(1), vd.unsqueeze(1), rgb)
    return rgb.to(torch.uint8)


def adjust_hue(images: torch.Tensor, hue_factor: torch.Tensor) -> torch.Tensor:
    """torchvision's PIL adjust_hue: to PIL HSV, add int(hue * 255) to H with uint8
    wrap-around, back to RGB. The HSV round trip itself is lossy, so it is applied
    even when the shift is 0, as in the reference."""
    h, s, v = _rgb_to_hsv(images)
    shift = torch.trunc(hue_factor.to(F64) * 255.0).to(torch.int64)
    h = torch.remainder(h + shift.view(-1, 1, 1), 256)
    return _hsv_to_rgb(h, s, v)


def color_jitter(
    images: torch.Tensor,
    order: torch.Tensor,
    brightness: torch.Tensor,
    contrast: torch.Tensor,
    saturation: torch.Tensor,
    hue: torch.Tensor,
) -> torch.Tensor:
    """ColorJitter with per-sample factors and order: ``order[:, t]`` is the function
    applied t-th (0 brightness, 1 contrast, 2 saturation, 3 hue, torchvision's ids).

    Hue (an HSV round trip, the costly op) sits at one position p per sample, so it runs
    once for the whole batch: the blends scheduled before it run first, in three masked
    passes (position t for the samples with t < p), then hue, then the blends after it
    (t > p). Each blend pass is brightness, contrast or saturation per sample: one blend
    with a per-sample degenerate image. No per-sample loop, no host sync."""
    hue_at = (order == 3).to(torch.int8).argmax(dim=1)
    factors = torch.stack([brightness, contrast, saturation], dim=1)
    out = images
    for t in range(3):
        out = _blend_pass(out, order[:, t], factors, t < hue_at)
    out = adjust_hue(out, hue)
    for t in range(1, 4):
        out = _blend_pass(out, order[:, t], factors, t > hue_at)
    return out


def _blend_pass(images: torch.Tensor, fn: torch.Tensor, factors: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """Brightness (fn 0), contrast (1) or saturation (2) per sample where ``active``; the
    others (hue's slot included) pass through unchanged."""
    f = _col(fn)
    luma = _luma(images)  # the 'L' image serves both the contrast and the saturation degenerate
    degenerate = torch.where(f == 1, _contrast_degenerate(images, luma), torch.where(f == 2, luma, 0))
    factor = factors.gather(1, fn.clamp(max=2).view(-1, 1)).squeeze(1)
    return torch.where(_col(active), _blend(degenerate, images, factor), images)


# --------------------------------------------------------------------------------------
# CUDA graphs: the pipelines are ~1,500 tiny kernels each, so on a GPU they are bound by
# launch overhead (H200, N=1024: simclr_augment 10-16 ms eagerly, about the same at
# N=4096). The apply step has no host syncs and no data-dependent shapes, so the public
# entry points draw the parameters eagerly and replay a graph of the apply step captured
# once per batch shape (H200, N=1024: simclr_augment 3.9 ms, boosted_randaugment k=2
# 2.2 ms). Same kernels, so the same bits as eager execution (tested). Those timings
# predate cuts in op count (hue once per batch in colour jitter, both crop axes' weights in
# one computation, the pixel-free parameters of all RandAugment rounds computed together):
# apply_simclr went from 881 to 510 dispatched ops, apply_randaug k=2 from 980 to 698;
# GPU time not yet re-measured.
# --------------------------------------------------------------------------------------

USE_CUDA_GRAPHS = True
_GRAPH_CACHE_SIZE = 8
_GRAPHS: dict = {}


def _graphed(name: str, fn, images: torch.Tensor, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """``fn(images, tensors)``, through a cached CUDA graph when ``images`` is on CUDA."""
    if not (USE_CUDA_GRAPHS and images.is_cuda) or torch.cuda.is_current_stream_capturing():
        return fn(images, tensors)
    key = (name, tuple(images.shape), str(images.device),
           tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(tensors.items())))
    entry = _GRAPHS.get(key)
    if entry is None:
        try:
            entry = _capture(fn, images, tensors)
        except RuntimeError:  # capture unsupported here: stay eager for this shape
            entry = False
        if len(_GRAPHS) >= _GRAPH_CACHE_SIZE:
            _GRAPHS.pop(next(iter(_GRAPHS)))
        _GRAPHS[key] = entry
    if entry is False:
        return fn(images, tensors)
    graph, static_images, static_tensors, static_out = entry
    static_images.copy_(images)
    for k, v in tensors.items():
        static_tensors[k].copy_(v)
    graph.replay()
    return static_out.clone()


def _capture(fn, images: torch.Tensor, tensors: dict[str, torch.Tensor]):
    static_images = images.clone()
    static_tensors = {k: v.clone() for k, v in tensors.items()}
    side = torch.cuda.Stream(device=images.device)
    side.wait_stream(torch.cuda.current_stream(images.device))
    with torch.cuda.stream(side):  # warm-up: constant cache, cuBLAS workspace
        for _ in range(2):
            fn(static_images, static_tensors)
    torch.cuda.current_stream(images.device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = fn(static_images, static_tensors)
    return graph, static_images, static_tensors, static_out


def _check_batch(images: torch.Tensor) -> None:
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected a uint8 batch (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")


def draw_simclr_params(
    n: int, generator: torch.Generator, height: int = 32, width: int = 32, device=None
) -> dict[str, torch.Tensor]:
    """Every random parameter of steps 1-4 for N samples, drawn in a fixed order."""
    dev = torch.device(device) if device is not None else generator.device
    top, left, ch, cw = draw_crop_params(n, generator, height, width, device=dev)
    flip = torch.rand(n, generator=generator, device=dev) < 0.5
    jitter = torch.rand(n, generator=generator, device=dev) < 0.8
    order = torch.rand(n, 4, generator=generator, device=dev).argsort(dim=1)  # uniform permutation
    factors = torch.rand(n, 4, generator=generator, device=dev, dtype=F32)
    bcs = 0.6 + 0.8 * factors[:, :3]  # brightness, contrast, saturation in [1 - .4, 1 + .4]
    hue = -0.1 + 0.2 * factors[:, 3]  # in [-.1, .1]
    gray = torch.rand(n, generator=generator, device=dev) < 0.2
    return dict(
        top=top, left=left, height=ch, width=cw, flip=flip, jitter=jitter, order=order,
        brightness=bcs[:, 0], contrast=bcs[:, 1], saturation=bcs[:, 2], hue=hue, gray=gray,
    )


def apply_simclr(images: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """Steps 1-4 with given per-sample parameters (see ``draw_simclr_params``)."""
    _check_batch(images)
    p = params
    x = resized_crop(images, p["top"], p["left"], p["height"], p["width"], size=images.shape[2])
    x = torch.where(_col(p["flip"]), hflip(x), x)
    jittered = color_jitter(x, p["order"], p["brightness"], p["contrast"], p["saturation"], p["hue"])
    x = torch.where(_col(p["jitter"]), jittered, x)
    return torch.where(_col(p["gray"]), rgb_to_grayscale(x), x)


def simclr_augment_with_params(images: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
    """``simclr_augment`` that also returns every drawn parameter (for replay in tests)."""
    _check_batch(images)
    n, _, h, w = images.shape
    params = draw_simclr_params(n, generator, h, w, device=images.device)
    return _graphed("simclr", apply_simclr, images, params), params


def simclr_augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Steps 1-4 of SPEC 6 on a uint8 batch (N,3,32,32): random resized crop (scale
    [0.1, 1], ratio [3/4, 4/3] log-uniform, torchvision's 10-try sampling with
    centre-crop fallback, PIL bicubic), hflip p=0.5, p=0.8 colour jitter (brightness .4,
    contrast .4, saturation .4, hue .1, the four in a random order per sample, as
    torchvision ColorJitter with PIL input), grayscale p=0.2. Returns uint8."""
    return simclr_augment_with_params(images, generator)[0]


# --------------------------------------------------------------------------------------
# step 5: boosted RandAugment (the reference's RandAugment_prob over 15 PIL ops)
# --------------------------------------------------------------------------------------


def affine_nearest(images: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """PIL ``Image.transform(size, AFFINE, matrix)`` with NEAREST and black fill, per
    sample; ``matrix`` (N, 6) = (a, b, c, d, e, f): output pixel (x, y) samples input
    (a x + b y + c, d x + e y + f) at pixel centres.

    PIL takes two code paths and both are reproduced: with no shear/rotation part
    (b = d = 0) it uses float ``ImagingScaleAffine``; otherwise it uses 16.16 fixed
    point (``affine_fixed``), which integer arithmetic here matches exactly.
    """
    n, c, h, w = images.shape
    dev = images.device
    a = matrix.to(F64)
    y = torch.arange(h, device=dev).view(1, h, 1)
    x = torch.arange(w, device=dev).view(1, 1, w)

    # 16.16 fixed point of (a, b, c', d, e, f') with the offsets moved to pixel centres
    centred = torch.stack([a[:, 2] + a[:, 0] * 0.5 + a[:, 1] * 0.5, a[:, 5] + a[:, 3] * 0.5 + a[:, 4] * 0.5], 1)
    fixed = torch.floor(torch.cat([a[:, [0, 1, 3, 4]], centred], 1) * 65536.0 + 0.5).to(torch.int64)
    a0, a1, a3, a4, a2, a5 = (fixed[:, i].view(-1, 1, 1) for i in range(6))
    xi_fixed = torch.div(a2 + y * a1 + x * a0, 65536, rounding_mode="floor")
    yi_fixed = torch.div(a5 + y * a4 + x * a3, 65536, rounding_mode="floor")

    col = lambda v: v.view(-1, 1, 1)  # noqa: E731
    xi_scale = torch.floor(col(a[:, 2] + a[:, 0] * 0.5) + x.to(F64) * col(a[:, 0])).to(torch.int64)
    yi_scale = torch.floor(col(a[:, 5] + a[:, 4] * 0.5) + y.to(F64) * col(a[:, 4])).to(torch.int64)
    xi_scale, yi_scale = xi_scale.expand(n, h, w), yi_scale.expand(n, h, w)

    scale_path = col((a[:, 1] == 0) & (a[:, 3] == 0))
    xi = torch.where(scale_path, xi_scale, xi_fixed)
    yi = torch.where(scale_path, yi_scale, yi_fixed)
    valid = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
    idx = (yi.clamp(0, h - 1) * w + xi.clamp(0, w - 1)).view(n, 1, h * w).expand(n, c, h * w)
    out = images.reshape(n, c, h * w).gather(2, idx).view(n, c, h, w)
    return torch.where(valid.unsqueeze(1), out, torch.zeros_like(out))


def _affine_rows(n: int, device, dtype=F64) -> list[torch.Tensor]:
    one, zero = torch.ones(n, device=device, dtype=dtype), torch.zeros(n, device=device, dtype=dtype)
    return [one, zero, zero, zero, one.clone(), zero.clone()]


def _rotate_matrix(degrees: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The matrix PIL's Image.rotate(degrees) builds (about the centre, counter-clockwise)."""
    ang = -(torch.remainder(degrees.to(F64), 360.0) * (math.pi / 180.0))
    cos = torch.round(torch.cos(ang), decimals=15)
    sin = torch.round(torch.sin(ang), decimals=15)
    cx, cy = width / 2.0, height / 2.0
    c = cos * -cx + sin * -cy + cx
    f = -sin * -cx + cos * -cy + cy
    return torch.stack([cos, sin, c, -sin, cos, f], dim=-1)


def _affine_one(images: torch.Tensor, slot: int, value: torch.Tensor) -> torch.Tensor:
    """Identity affine (1, 0, 0, 0, 1, 0) with coefficient `slot` set per sample."""
    m = _affine_rows(len(value), images.device)
    m[slot] = value.to(F64)
    return affine_nearest(images, torch.stack(m, 1))


def shear_x(images: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Output (x, y) samples input (x + v y, y): PIL transform (1, v, 0, 0, 1, 0)."""
    return _affine_one(images, 1, v)


def shear_y(images: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Output (x, y) samples input (x, y + v x): PIL transform (1, 0, 0, v, 1, 0)."""
    return _affine_one(images, 3, v)


def translate_x(images: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    """Output (x, y) samples input (x + pixels, y), so positive values move content left."""
    return _affine_one(images, 2, pixels)


def translate_y(images: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    """Output (x, y) samples input (x, y + pixels), so positive values move content up."""
    return _affine_one(images, 5, pixels)


def rotate(images: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """PIL Image.rotate(degrees) (counter-clockwise, about the centre, NEAREST, black)."""
    return affine_nearest(images, _rotate_matrix(degrees, images.shape[2], images.shape[3]))


# Point ops are per-sample, per-channel 256-entry lookup tables, as PIL applies them
# (image.point); several can be merged into one table per sample and one gather.


def _apply_lut(images: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """images (N, C, H, W) uint8, lut (N, C, 256) or broadcastable -> uint8."""
    n, c, h, w = images.shape
    lut = lut.to(torch.uint8).expand(n, c, 256)
    return lut.gather(2, images.reshape(n, c, h * w).to(torch.int64)).view(n, c, h, w)


def _levels(images: torch.Tensor, dtype=torch.int64) -> torch.Tensor:
    return torch.arange(256, device=images.device, dtype=dtype).view(1, 1, 256)


def _autocontrast_lut(images: torch.Tensor) -> torch.Tensor:
    x = images.flatten(2)
    lo = x.amin(dim=2, keepdim=True).to(F64)
    hi = x.amax(dim=2, keepdim=True).to(F64)
    stretch = hi > lo
    scale = _div(255.0, torch.where(stretch, hi - lo, 1.0))
    offset = -lo * scale
    i = _levels(images, F64)
    return torch.where(stretch, torch.trunc(i * scale + offset).clamp(0, 255), i).to(torch.int64)


def _equalize_lut(images: torch.Tensor) -> torch.Tensor:
    n, c = images.shape[:2]
    x = images.reshape(n * c, -1).to(torch.int64)
    hist = torch.zeros(n * c, 256, dtype=torch.int64, device=images.device)
    hist.scatter_add_(1, x, torch.ones_like(x))
    present = hist > 0
    last = 255 - present.flip(1).to(torch.int8).argmax(dim=1, keepdim=True)
    step = (x.shape[1] - hist.gather(1, last)) // 255
    lut = ((step // 2 + torch.cumsum(hist, 1) - hist) // step.clamp(min=1)).clamp(max=255)
    keep = (present.sum(1, keepdim=True) <= 1) | (step == 0)
    lut = torch.where(keep, _levels(images).view(1, 256), lut)
    return lut.view(n, c, 256)


def _solarize_lut(images: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    i = _levels(images)
    return torch.where(i.to(F64) < threshold.to(F64).view(-1, 1, 1), i, 255 - i)


def _posterize_lut(images: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    mask = 255 - ((1 << (8 - bits.to(torch.int64))) - 1)
    return _levels(images) & mask.view(-1, 1, 1)


def autocontrast(images: torch.Tensor) -> torch.Tensor:
    """ImageOps.autocontrast (cutoff 0): per channel, lut(i) = int(i*scale - lo*scale)
    with scale = 255 / (hi - lo), clipped; channels with hi <= lo are left unchanged."""
    return _apply_lut(images, _autocontrast_lut(images))


def invert(images: torch.Tensor) -> torch.Tensor:
    return 255 - images


def equalize(images: torch.Tensor) -> torch.Tensor:
    """ImageOps.equalize per channel: step = (total - h[last non-zero]) // 255,
    lut[i] = (step // 2 + sum(h[:i])) // step (clipped to 255 by PIL's point());
    identity when at most one level is present or step is 0."""
    return _apply_lut(images, _equalize_lut(images))


def solarize(images: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """ImageOps.solarize: invert every pixel >= threshold (a float compare, as in PIL's lut)."""
    return _apply_lut(images, _solarize_lut(images, threshold))


def posterize(images: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """ImageOps.posterize: keep the ``bits`` (int, 1..8) most significant bits."""
    return _apply_lut(images, _posterize_lut(images, bits))


CUTOUT_FILL = (125, 123, 114)


def cutout(
    images: torch.Tensor,
    left: torch.Tensor,
    top: torch.Tensor,
    right: torch.Tensor,
    bottom: torch.Tensor,
    fill: tuple[int, int, int] = CUTOUT_FILL,
) -> torch.Tensor:
    """Fill the per-sample box left <= x <= right, top <= y <= bottom (inclusive, as
    PIL's ImageDraw.rectangle draws it) with ``fill``. Empty boxes (right < left) are no-ops."""
    h, w = images.shape[-2:]
    y = torch.arange(h, device=images.device).view(1, 1, h, 1)
    x = torch.arange(w, device=images.device).view(1, 1, 1, w)
    inside = (x >= _col(left)) & (x <= _col(right)) & (y >= _col(top)) & (y <= _col(bottom))
    colour = _const(tuple(fill), torch.uint8, images.device).view(1, 3, 1, 1)
    return torch.where(inside, colour, images)


def cutout_box(
    cx: torch.Tensor, cy: torch.Tensor, side: torch.Tensor, height: int, width: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The reference's CutoutAbs arithmetic: x0 = int(max(0, cx - side/2)),
    x1 = min(width, x0 + side), then PIL draws columns x0..int(x1) inclusive (clipped to
    the image); same for rows. So a square is floor(side) + 1 pixels wide unless it hits
    the right/bottom edge. side <= 0 gives an empty box (the reference returns early)."""
    side = side.to(F64)
    x0 = torch.floor((cx.to(F64) - side / 2.0).clamp(min=0.0))
    y0 = torch.floor((cy.to(F64) - side / 2.0).clamp(min=0.0))
    x1 = torch.floor(torch.minimum(x0 + side, torch.full_like(x0, float(width)))).clamp(max=width - 1)
    y1 = torch.floor(torch.minimum(y0 + side, torch.full_like(y0, float(height)))).clamp(max=height - 1)
    empty = side <= 0
    x1 = torch.where(empty, x0 - 1, x1)
    return x0.to(torch.int64), y0.to(torch.int64), x1.to(torch.int64), y1.to(torch.int64)


# The reference's augment_list(): (name, min, max), in its order. The SPEC text says
# "the 14 below" but its table (and the reference list, indices 0-14) has 15 ops, and
# random.choices draws from all 15, so all 15 are used.
RANDAUG_OPS: tuple[tuple[str, float, float], ...] = (
    ("ShearX", 0.0, 0.6),
    ("ShearY", 0.0, 0.6),
    ("TranslateX", 0.0, 0.66),
    ("TranslateY", 0.0, 0.66),
    ("Rotate", 0.0, 60.0),
    ("AutoContrast", 0.0, 1.0),
    ("Invert", 0.0, 1.0),
    ("Equalize", 0.0, 1.0),
    ("Solarize", 0.0, 110.0),
    ("Posterize", 4.0, 8.0),
    ("Contrast", 0.1, 1.9),
    ("Color", 0.1, 1.9),
    ("Brightness", 0.1, 1.9),
    ("Sharpness", 0.1, 1.9),
    ("Cutout", 0.0, 0.4),
)
OP_INDEX = {name: i for i, (name, _, _) in enumerate(RANDAUG_OPS)}

# The reference draws the Cutout centre with np.random.uniform(w), i.e. low = w,
# high = 1: uniform on (1, w], not [0, w). Kept, to reproduce its distribution.
CUTOUT_CENTRE_REFERENCE_QUIRK = True


def op_value(name: str, magnitude: torch.Tensor) -> torch.Tensor:
    """v = m / 30 * (max - min) + min in float64, in the reference's operation order (unsigned)."""
    op = torch.full(magnitude.shape, OP_INDEX[name], dtype=torch.int64, device=magnitude.device)
    return op_values(op, magnitude, torch.zeros(magnitude.shape, dtype=torch.bool, device=magnitude.device))


_SPAN = tuple(float(hi - lo) for _, lo, hi in RANDAUG_OPS)
_LOW = tuple(float(lo) for _, lo, _ in RANDAUG_OPS)
# which affine coefficient each geometric op sets (Rotate builds a whole matrix; -1: none)
_AFFINE_SLOT = (1, 3, 2, 5) + (-1,) * (len(RANDAUG_OPS) - 4)


def op_values(op: torch.Tensor, magnitude: torch.Tensor, negate: torch.Tensor) -> torch.Tensor:
    """v = m / 30 * (max - min) + min of every sample's own op (any shape; float64, in the
    reference's operation order), sign-flipped where ``negate`` for the signed ops, the five
    geometric ones (ShearX ... Rotate, listed first)."""
    span, low = _const(_SPAN, F64, op.device)[op], _const(_LOW, F64, op.device)[op]
    v = _div(magnitude.to(F64), 30.0) * span + low
    return torch.where(negate & (op <= OP_INDEX["Rotate"]), -v, v)


def _op_matrix(op: torch.Tensor, v: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The affine matrix (..., 6) of each sample's op: Rotate's, or the identity with ShearX
    (b), ShearY (d), TranslateX (c = v * width) or TranslateY (f = v * height) set."""
    rot = _rotate_matrix(v, height, width)
    identity = _const((1.0, 0.0, 0.0, 0.0, 1.0, 0.0), F64, op.device).expand_as(rot)
    m = torch.where((op == OP_INDEX["Rotate"]).unsqueeze(-1), rot, identity)
    value = torch.where(op == OP_INDEX["TranslateX"], v * width,
                        torch.where(op == OP_INDEX["TranslateY"], v * height, v))
    slot = _const(_AFFINE_SLOT, torch.int64, op.device)[op]
    here = torch.arange(6, device=op.device) == slot.unsqueeze(-1)
    return torch.where(here, value.unsqueeze(-1), m)


def _round_params(op: torch.Tensor, magnitude: torch.Tensor, negate: torch.Tensor, cutout_u: torch.Tensor,
                  height: int, width: int) -> dict[str, torch.Tensor]:
    """Everything of a round that does not depend on the pixels, for any leading shape (all k
    rounds at once): op, value, affine matrix, posterize bits, Cutout box."""
    v = op_values(op, magnitude, negate)
    side = v * width  # the reference scales by img.size[0] for both axes
    u = cutout_u.to(F64)
    if CUTOUT_CENTRE_REFERENCE_QUIRK:
        cx, cy = width - (width - 1) * u[..., 0], height - (height - 1) * u[..., 1]
    else:
        cx, cy = width * u[..., 0], height * u[..., 1]
    x0, y0, x1, y1 = cutout_box(cx, cy, side, height, width)
    return dict(op=op, v=v, matrix=_op_matrix(op, v, height, width),
                bits=torch.trunc(v).clamp(1, 8).to(torch.int64),  # int(v), at least 1
                box=torch.stack([x0, y0, x1, y1], -1))


def _apply_round(images: torch.Tensor, r: dict[str, torch.Tensor]) -> torch.Tensor:
    """One round on the batch: every op evaluated for all samples, each keeps its own."""
    n = images.shape[0]
    op, v = r["op"], r["v"]
    is_op = {name: op == i for name, i in OP_INDEX.items()}
    out = torch.where(_col(op <= OP_INDEX["Rotate"]), affine_nearest(images, r["matrix"]), images)

    # the five point ops: one per-sample lookup table, one gather
    lut = _levels(images).expand(n, 3, 256)
    lut = torch.where(_col3(is_op["AutoContrast"]), _autocontrast_lut(images), lut)
    lut = torch.where(_col3(is_op["Invert"]), 255 - _levels(images), lut)
    lut = torch.where(_col3(is_op["Equalize"]), _equalize_lut(images), lut)
    lut = torch.where(_col3(is_op["Solarize"]), _solarize_lut(images, v), lut)
    lut = torch.where(_col3(is_op["Posterize"]), _posterize_lut(images, r["bits"]), lut)
    is_point = (op >= OP_INDEX["AutoContrast"]) & (op <= OP_INDEX["Posterize"])
    out = torch.where(_col(is_point), _apply_lut(images, lut), out)

    # the four ImageEnhance ops (factor v): one blend with a per-sample degenerate image
    luma = _luma(images)
    degenerate = torch.where(
        _col(is_op["Sharpness"]),
        _sharpness_degenerate(images),
        torch.where(_col(is_op["Contrast"]), _contrast_degenerate(images, luma),
                    torch.where(_col(is_op["Color"]), luma, 0)),
    )
    is_enhance = (op >= OP_INDEX["Contrast"]) & (op <= OP_INDEX["Sharpness"])
    out = torch.where(_col(is_enhance), _blend(degenerate, images, v), out)

    box = r["box"]
    cut = cutout(images, box[:, 0], box[:, 1], box[:, 2], box[:, 3])
    return torch.where(_col(is_op["Cutout"]), cut, out)


def apply_op(
    images: torch.Tensor,
    op: torch.Tensor,
    magnitude: torch.Tensor,
    negate: torch.Tensor,
    cutout_u: torch.Tensor,
) -> torch.Tensor:
    """Apply op ``op[i]`` (index into RANDAUG_OPS) with magnitude ``magnitude[i]`` to each
    sample; ``negate`` flips the sign of the signed ops, ``cutout_u`` (N, 2) in [0, 1)
    places the Cutout centre. The five geometric ops share one affine gather, the five
    point ops one lookup table, the four enhance ops one blend; every op is evaluated on
    the whole batch and selected with torch.where (cheap at 32x32, free of host syncs)."""
    h, w = images.shape[-2:]
    return _apply_round(images, _round_params(op, magnitude.to(F64), negate, cutout_u, h, w))


def draw_randaug_params(
    n: int, k: int, weight: torch.Tensor, generator: torch.Generator, device=None
) -> dict[str, torch.Tensor]:
    """Every random parameter of step 5, each (k, N) (``cutout_u`` (k, N, 2)): the op
    of each round, whether it is applied (u < weight, an independent draw per round),
    the sign flip of signed ops (the reference's random() > 0.5), the Cutout centre."""
    dev = torch.device(device) if device is not None else generator.device
    weight = weight.to(device=dev, dtype=F64).reshape(n)
    op = torch.randint(0, len(RANDAUG_OPS), (k, n), generator=generator, device=dev)
    applied = torch.rand(k, n, generator=generator, device=dev, dtype=F64) < weight
    negate = torch.rand(k, n, generator=generator, device=dev) > 0.5
    cutout_u = torch.rand(k, n, 2, generator=generator, device=dev, dtype=F64)
    return dict(op=op, applied=applied, negate=negate, cutout_u=cutout_u)


def apply_randaug(images: torch.Tensor, magnitude: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """Step 5 with given parameters (see ``draw_randaug_params``); rounds run in turn."""
    _check_batch(images)
    magnitude = magnitude.to(device=images.device, dtype=F64).reshape(images.shape[0])
    h, w = images.shape[-2:]
    # the pixel-independent parameters of all k rounds in one go (fewer, larger kernels)
    rounds = _round_params(params["op"], magnitude, params["negate"], params["cutout_u"], h, w)
    x = images
    for r in range(params["op"].shape[0]):
        new = _apply_round(x, {key: val[r] for key, val in rounds.items()})
        x = torch.where(_col(params["applied"][r]), new, x)
    return x


def boosted_randaugment_with_params(
    images: torch.Tensor,
    weight: torch.Tensor,
    magnitude: torch.Tensor,
    k: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, dict]:
    """``boosted_randaugment`` that also returns the drawn parameters."""
    _check_batch(images)
    params = draw_randaug_params(images.shape[0], k, weight, generator, device=images.device)
    tensors = dict(params, magnitude=magnitude.to(device=images.device, dtype=F64).reshape(images.shape[0]))
    apply = lambda x, t: apply_randaug(x, t["magnitude"], t)  # noqa: E731
    return _graphed("randaug", apply, images, tensors), params


def boosted_randaugment(
    images: torch.Tensor,
    weight: torch.Tensor,
    magnitude: torch.Tensor,
    k: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """Step 5: for each sample choose k ops uniformly with replacement from the
    reference's 15 (ShearX, ShearY, TranslateX, TranslateY, Rotate, AutoContrast, Invert,
    Equalize, Solarize, Posterize, Contrast, Color, Brightness, Sharpness, Cutout) and
    apply each in turn with probability ``weight[i]`` (an independent draw per op),
    with value v = m/30*(max-min)+min for the per-sample magnitude m and a random sign
    for the geometric ops. Weight 0 leaves a sample unchanged. Returns uint8."""
    return boosted_randaugment_with_params(images, weight, magnitude, k, generator)[0]


def to_unit_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 -> float32 in [0, 1] (torchvision's ToTensor: x / 255)."""
    return images.to(F32).div(255.0)
