"""methods/augment.py against the reference pipeline: torchvision transforms on PIL images
followed by the authors' PIL RandAugment (data/randaug.py of MediaBrain-SJTU/BCL).

Every op is run batched on the fixture images (256 CIFAR-100 test images when
../shared/data exists) with given parameters and compared with PIL / torchvision's
PIL functionals on the same images and parameters, for several magnitudes.

Tolerances (max |ours - PIL| over all pixels, all images, all parameters tried):

| op                                              | tolerance | why                       |
|-------------------------------------------------|-----------|---------------------------|
| resized crop (PIL bicubic, fixed point)         | 0         | same integer arithmetic   |
| hflip, grayscale, to_unit_float                 | 0         |                           |
| brightness / contrast / saturation (ImageEnhance)| 0        | same float32 blend, trunc |
| hue (PIL HSV round trip)                        | 0         | same float/double mix     |
| colour jitter, whole steps 1-4 replayed         | 0         |                           |
| ShearX/Y, Rotate (PIL 16.16 fixed-point affine) | 0         | same integer arithmetic   |
| TranslateX/Y (PIL float ScaleAffine)            | 0         |                           |
| AutoContrast, Invert, Equalize, Solarize,       | 0         | same lookup tables        |
| Posterize                                       |           |                           |
| Contrast, Color, Brightness, Sharpness          | 0         | same float32 blend        |
| Cutout                                          | 0         | same box arithmetic       |
| boosted RandAugment, k rounds replayed          | 0         |                           |

Everything is exact on these images. Bit-level differences remain possible in principle
where PIL's sequential float sums differ from torch's in the last ulp and the result
sits exactly on a rounding boundary (bicubic weight normalisation, float translation
accumulation); none occurs here.
"""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image, ImageDraw, ImageEnhance, ImageOps
from torch.utils._python_dispatch import TorchDispatchMode

from methods import augment as A

MAGNITUDES = [0.0, 5.0, 10.0, 13.7, 20.0, 25.5, 30.0]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def imgs(cifar_images) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(cifar_images))


# ------------------------------------------------------------------------- helpers


def to_pil(img: torch.Tensor) -> Image.Image:
    return Image.fromarray(img.permute(1, 2, 0).numpy())


def from_pil(im: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)


def pil_batch(images: torch.Tensor, fn) -> torch.Tensor:
    """Apply fn(i, pil_image) -> pil_image to every image; stack back to (N, 3, H, W)."""
    return torch.stack([from_pil(fn(i, to_pil(img))) for i, img in enumerate(images)])


def assert_close(ours: torch.Tensor, ref: torch.Tensor, tol: int = 0, what: str = "") -> None:
    assert ours.dtype == torch.uint8 and ours.shape == ref.shape
    diff = (ours.to(torch.int32) - ref.to(torch.int32)).abs()
    bad = int((diff > tol).sum())
    assert bad == 0, f"{what}: {bad} values off by more than {tol} (max {int(diff.max())})"


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# The reference RandAugment ops (data/randaug.py), written out with explicit parameters
# instead of drawing signs and Cutout centres from Python's / numpy's global RNG.
def value(name: str, m: float) -> float:
    _, lo, hi = A.RANDAUG_OPS[A.OP_INDEX[name]]
    return (float(m) / 30) * float(hi - lo) + lo


def pil_op(img: Image.Image, name: str, m: float, negate: bool = False, centre=(16.0, 16.0)):
    v = value(name, m)
    if name in ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate") and negate:
        v = -v
    if name == "ShearX":
        return img.transform(img.size, Image.AFFINE, (1, v, 0, 0, 1, 0))
    if name == "ShearY":
        return img.transform(img.size, Image.AFFINE, (1, 0, 0, v, 1, 0))
    if name == "TranslateX":
        return img.transform(img.size, Image.AFFINE, (1, 0, v * img.size[0], 0, 1, 0))
    if name == "TranslateY":
        return img.transform(img.size, Image.AFFINE, (1, 0, 0, 0, 1, v * img.size[1]))
    if name == "Rotate":
        return img.rotate(v)
    if name == "AutoContrast":
        return ImageOps.autocontrast(img)
    if name == "Invert":
        return ImageOps.invert(img)
    if name == "Equalize":
        return ImageOps.equalize(img)
    if name == "Solarize":
        return ImageOps.solarize(img, v)
    if name == "Posterize":
        return ImageOps.posterize(img, max(1, int(v)))
    if name in ("Contrast", "Color", "Brightness", "Sharpness"):
        return getattr(ImageEnhance, name)(img).enhance(v)
    if name == "Cutout":
        if v <= 0.0:
            return img
        v = v * img.size[0]
        w, h = img.size
        x0, y0 = centre
        x0 = int(max(0, x0 - v / 2.0))
        y0 = int(max(0, y0 - v / 2.0))
        x1 = min(w, x0 + v)
        y1 = min(h, y0 + v)
        img = img.copy()
        ImageDraw.Draw(img).rectangle((x0, y0, x1, y1), (125, 123, 114))
        return img
    raise KeyError(name)


def cutout_centres(u: torch.Tensor, size: int = 32) -> torch.Tensor:
    """The centre the module derives from its uniform draws: np.random.uniform(w) in the
    reference is uniform on (1, w] (low=w, high=1)."""
    return size - (size - 1) * u.double()


# ------------------------------------------------------------------------- steps 1-4


def test_resized_crop_matches_pil_for_drawn_boxes(imgs):
    top, left, h, w = A.draw_crop_params(len(imgs), gen(1))
    ours = A.resized_crop(imgs, top, left, h, w)
    ref = pil_batch(imgs, lambda i, im: im.crop(
        (int(left[i]), int(top[i]), int(left[i] + w[i]), int(top[i] + h[i]))).resize((32, 32), Image.BICUBIC))
    assert_close(ours, ref, 0, "crop+resize")
    # and torchvision's own resized_crop on PIL, which the reference calls
    ref_tv = pil_batch(imgs[:64], lambda i, im: TF.resized_crop(
        im, int(top[i]), int(left[i]), int(h[i]), int(w[i]), [32, 32], TF.InterpolationMode.BICUBIC))
    assert_close(ours[:64], ref_tv, 0, "torchvision resized_crop")


def test_resized_crop_arbitrary_boxes(imgs):
    """Any box, including 1-pixel, full-width/height and full-image ones."""
    g = gen(2)
    n = len(imgs)
    h = torch.randint(1, 33, (n,), generator=g)
    w = torch.randint(1, 33, (n,), generator=g)
    h[:8], w[:8] = 32, 32
    h[8:16] = 32
    w[16:24] = 32
    h[24:28], w[24:28] = 1, 1
    top = (torch.rand(n, generator=g) * (33 - h)).long().clamp(max=32 - h)
    left = (torch.rand(n, generator=g) * (33 - w)).long().clamp(max=32 - w)
    ours = A.resized_crop(imgs, top, left, h, w)
    ref = pil_batch(imgs, lambda i, im: im.crop(
        (int(left[i]), int(top[i]), int(left[i] + w[i]), int(top[i] + h[i]))).resize((32, 32), Image.BICUBIC))
    assert_close(ours, ref, 0, "crop+resize")
    assert torch.equal(ours[:8], imgs[:8])  # full-image crop is the identity, as in PIL


def test_resized_crop_non_square_images(imgs):
    """Width != height takes the per-axis weight path (square images share one computation)."""
    x = imgs[:32, :, :, 4:28].contiguous()  # 32 rows x 24 columns
    top, left, h, w = A.draw_crop_params(len(x), gen(3), height=32, width=24)
    ours = A.resized_crop(x, top, left, h, w)
    ref = pil_batch(x, lambda i, im: im.crop(
        (int(left[i]), int(top[i]), int(left[i] + w[i]), int(top[i] + h[i]))).resize((32, 32), Image.BICUBIC))
    assert_close(ours, ref, 0, "non-square crop+resize")


def test_crop_params_valid_and_distributed_like_torchvision():
    n = 20000
    top, left, h, w = A.draw_crop_params(n, gen(3))
    assert ((h >= 1) & (h <= 32) & (w >= 1) & (w <= 32)).all()
    assert ((top >= 0) & (top + h <= 32) & (left >= 0) & (left + w <= 32)).all()
    # rounding w and h moves area and ratio a little outside the nominal ranges
    assert (w * h >= 0.1 * 1024 * 0.8).all() and (w * h <= 1024).all()
    assert ((w / h) >= 0.75 * 0.85).all() and ((w / h) <= 4 / 3 / 0.85).all()
    # top/left uniform over their ranges: relative position has mean 1/2
    rel = (top.double() + 0.5) / (33 - h).double()
    assert abs(rel.mean().item() - 0.5) < 0.01

    # same distribution as torchvision's own sampler (means within 5 standard errors)
    m = 3000
    dummy = torch.zeros(3, 32, 32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        tv = torch.tensor([T.RandomResizedCrop.get_params(dummy, [0.1, 1.0], [3 / 4, 4 / 3]) for _ in range(m)])
    for ours_x, tv_x in ((h, tv[:, 2]), (w, tv[:, 3]), (h * w, tv[:, 2] * tv[:, 3])):
        ours_x, tv_x = ours_x.double(), tv_x.double()
        se = math.sqrt(ours_x.var() / n + tv_x.var() / m)
        assert abs(ours_x.mean() - tv_x.mean()) < 5 * se


def test_crop_fallback_is_centre_crop():
    # an unreachable scale makes all 10 tries invalid: whole image (ratio 1 is in range)
    top, left, h, w = A.draw_crop_params(50, gen(4), scale=(2.0, 3.0))
    assert (h == 32).all() and (w == 32).all() and (top == 0).all() and (left == 0).all()
    # a wide image: clamp the ratio to 4/3 and centre
    top, left, h, w = A.draw_crop_params(5, gen(4), height=20, width=40, scale=(2.0, 3.0))
    assert (h == 20).all() and (w == 27).all() and (top == 0).all() and (left == 6).all()


def test_hflip_and_grayscale_and_to_unit_float(imgs):
    assert_close(A.hflip(imgs), pil_batch(imgs, lambda i, im: TF.hflip(im)), 0, "hflip")
    gray = A.rgb_to_grayscale(imgs)
    assert_close(gray, pil_batch(imgs, lambda i, im: TF.rgb_to_grayscale(im, 3)), 0, "grayscale")
    ref = torch.stack([T.ToTensor()(to_pil(im)) for im in imgs[:32]])
    out = A.to_unit_float(imgs[:32])
    assert out.dtype == torch.float32 and torch.equal(out, ref)


@pytest.mark.parametrize("op, ref", [
    (A.adjust_brightness, TF.adjust_brightness),
    (A.adjust_contrast, TF.adjust_contrast),
    (A.adjust_saturation, TF.adjust_saturation),
])
def test_jitter_blends_match_torchvision_pil(imgs, op, ref):
    n = len(imgs)
    factors = [0.6, 0.77, 1.0, 1.13, 1.4]
    for f in factors:
        out = op(imgs, torch.full((n,), f))
        assert_close(out, pil_batch(imgs, lambda i, im: ref(im, f)), 0, f"{op.__name__} {f}")
    rnd = 0.6 + 0.8 * torch.rand(n, generator=gen(5))  # float32, as the sampler draws them
    out = op(imgs, rnd)
    assert_close(out, pil_batch(imgs, lambda i, im: ref(im, float(rnd[i]))), 0, f"{op.__name__} random")


def test_hue_matches_torchvision_pil(imgs):
    n = len(imgs)
    for hue in [-0.5, -0.1, -0.0371, -0.003, 0.0, 0.002, 0.05, 0.1, 0.5]:
        out = A.adjust_hue(imgs, torch.full((n,), hue))
        assert_close(out, pil_batch(imgs, lambda i, im: TF.adjust_hue(im, hue)), 0, f"hue {hue}")
    rnd = -0.1 + 0.2 * torch.rand(n, generator=gen(6))
    out = A.adjust_hue(imgs, rnd)
    assert_close(out, pil_batch(imgs, lambda i, im: TF.adjust_hue(im, float(rnd[i]))), 0, "hue random")


def test_hue_on_all_colour_kinds():
    """Random colours plus greys, primaries and saturated edges, as one 64x64 image each."""
    g = gen(7)
    cols = torch.randint(0, 256, (4, 3, 64, 64), generator=g, dtype=torch.uint8)
    levels = torch.arange(256, dtype=torch.uint8)
    cols[0, :, :4] = levels.view(1, 4, 64)  # greys
    cols[1, 0], cols[1, 1] = 255, 0  # red..magenta
    cols[2, 1] = cols[2, 2]  # g == b
    cols[3, 0] = cols[3, 1]  # r == g (yellow-ish ties)
    for hue in [-0.1, 0.0, 0.031, 0.1]:
        out = A.adjust_hue(cols, torch.full((4,), hue))
        assert_close(out, pil_batch(cols, lambda i, im: TF.adjust_hue(im, hue)), 0, f"hue {hue}")


def test_simclr_steps_replayed_through_torchvision(imgs, monkeypatch):
    """The whole of steps 1-4 with the drawn parameters, replayed through torchvision's
    PIL functionals and its real ColorJitter module (get_params patched to the drawn
    order and factors, so the meaning of the order ids is torchvision's own)."""
    out, p = A.simclr_augment_with_params(imgs, gen(8))
    jitter = T.ColorJitter(0.4, 0.4, 0.4, 0.1)
    current = {}
    monkeypatch.setattr(T.ColorJitter, "get_params", staticmethod(lambda *a: current["params"]))

    def replay(i, im):
        im = TF.resized_crop(im, int(p["top"][i]), int(p["left"][i]), int(p["height"][i]),
                             int(p["width"][i]), [32, 32], TF.InterpolationMode.BICUBIC)
        if p["flip"][i]:
            im = TF.hflip(im)
        if p["jitter"][i]:
            current["params"] = (p["order"][i], float(p["brightness"][i]), float(p["contrast"][i]),
                                 float(p["saturation"][i]), float(p["hue"][i]))
            im = jitter(im)
        if p["gray"][i]:
            im = TF.rgb_to_grayscale(im, 3)
        return im

    assert_close(out, pil_batch(imgs, replay), 0, "steps 1-4")
    assert p["jitter"].any() and (~p["jitter"]).any() and p["gray"].any() and p["flip"].any()


def test_simclr_draws_probabilities_and_ranges():
    n = 24000
    p = A.draw_simclr_params(n, gen(9))
    for key, prob in (("flip", 0.5), ("jitter", 0.8), ("gray", 0.2)):
        rate = p[key].double().mean().item()
        assert abs(rate - prob) < 5 * math.sqrt(prob * (1 - prob) / n), (key, rate)
    for key in ("brightness", "contrast", "saturation"):
        assert p[key].min() >= 0.6 and p[key].max() <= 1.4
        assert abs(p[key].mean().item() - 1.0) < 0.01
    assert p["hue"].min() >= -0.1 and p["hue"].max() <= 0.1 and abs(p["hue"].mean().item()) < 0.003
    # the colour-jitter order is a random permutation per sample: all 24 appear, evenly
    assert (p["order"].sort(dim=1).values == torch.arange(4)).all()
    counts = {}
    for row in p["order"].tolist():
        counts[tuple(row)] = counts.get(tuple(row), 0) + 1
    assert set(counts) == set(itertools.permutations(range(4)))
    expected = n / 24
    assert all(abs(c - expected) < 5 * math.sqrt(expected) for c in counts.values())


def test_jitter_order_matters_and_differs_between_samples(imgs):
    """Different samples really are jittered in different orders: applying one sample's
    parameters with another order changes the result."""
    n = len(imgs)
    orders = torch.stack([torch.tensor([0, 1, 2, 3]), torch.tensor([3, 2, 1, 0])]).repeat(n // 2, 1)
    f = torch.full((n,), 1.35)
    out = A.color_jitter(imgs, orders, f, f, torch.full((n,), 0.65), torch.full((n,), 0.08))
    swapped = A.color_jitter(imgs, orders.flip(0), f, f, torch.full((n,), 0.65), torch.full((n,), 0.08))
    assert (out != swapped).flatten(1).any(1).float().mean() > 0.9


# ------------------------------------------------------------------------- step 5, op by op

GEOMETRIC = {
    "ShearX": lambda x, v: A.shear_x(x, v),
    "ShearY": lambda x, v: A.shear_y(x, v),
    "TranslateX": lambda x, v: A.translate_x(x, v * x.shape[3]),
    "TranslateY": lambda x, v: A.translate_y(x, v * x.shape[2]),
    "Rotate": lambda x, v: A.rotate(x, v),
}
PIXEL = {
    "AutoContrast": lambda x, v: A.autocontrast(x),
    "Invert": lambda x, v: A.invert(x),
    "Equalize": lambda x, v: A.equalize(x),
    "Solarize": lambda x, v: A.solarize(x, v),
    "Posterize": lambda x, v: A.posterize(x, torch.trunc(v).long().clamp(min=1)),
    "Contrast": lambda x, v: A.adjust_contrast(x, v),
    "Color": lambda x, v: A.adjust_saturation(x, v),
    "Brightness": lambda x, v: A.adjust_brightness(x, v),
    "Sharpness": lambda x, v: A.sharpness(x, v),
}


def test_every_reference_op_is_implemented():
    names = [name for name, _, _ in A.RANDAUG_OPS]
    assert names == ["ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "AutoContrast", "Invert",
                     "Equalize", "Solarize", "Posterize", "Contrast", "Color", "Brightness", "Sharpness",
                     "Cutout"]
    assert set(GEOMETRIC) | set(PIXEL) | {"Cutout"} == set(names)


@pytest.mark.parametrize("name", list(GEOMETRIC) + list(PIXEL))
def test_op_matches_pil(imgs, name):
    """Each op for several magnitudes (both signs for the signed ones) and for a random
    per-sample magnitude, against the reference op on PIL images."""
    n = len(imgs)
    fn = {**GEOMETRIC, **PIXEL}[name]
    negate = torch.arange(n) % 2 == 1
    signed = name in GEOMETRIC
    settings = [torch.full((n,), m, dtype=torch.float64) for m in MAGNITUDES]
    settings.append(30 * torch.rand(n, generator=gen(10), dtype=torch.float64))
    for mag in settings:
        v = A.op_value(name, mag)
        if signed:
            v = torch.where(negate, -v, v)
        out = fn(imgs, v)
        ref = pil_batch(imgs, lambda i, im: pil_op(im, name, float(mag[i]), bool(negate[i]) and signed))
        assert_close(out, ref, 0, f"{name} m={mag[0].item():.2f}")


def test_cutout_matches_pil(imgs):
    n = len(imgs)
    u = torch.rand(n, 2, generator=gen(11), dtype=torch.float64)
    u[:8] = 0.0  # centre at the far right/bottom edge (x = 32)
    u[8:16] = 1.0 - 1e-12  # centre near 1, the smallest the reference draws
    centres = cutout_centres(u)
    for mag in [torch.full((n,), m, dtype=torch.float64) for m in MAGNITUDES] + [
            30 * torch.rand(n, generator=gen(12), dtype=torch.float64)]:
        side = A.op_value("Cutout", mag) * 32
        out = A.cutout(imgs, *A.cutout_box(centres[:, 0], centres[:, 1], side, 32, 32))
        ref = pil_batch(imgs, lambda i, im: pil_op(im, "Cutout", float(mag[i]),
                                                   centre=(float(centres[i, 0]), float(centres[i, 1]))))
        assert_close(out, ref, 0, f"Cutout m={mag[0].item():.2f}")


def test_apply_op_mixes_ops_per_sample(imgs):
    """apply_op (the batched selection of 15 ops with per-sample op, magnitude, sign and
    Cutout centre) against the reference ops."""
    n = len(imgs)
    g = gen(13)
    op = torch.arange(n) % len(A.RANDAUG_OPS)
    negate = torch.rand(n, generator=g) > 0.5
    u = torch.rand(n, 2, generator=g, dtype=torch.float64)
    centres = cutout_centres(u)
    for mag in (30 * torch.rand(n, generator=g, dtype=torch.float64), torch.full((n,), 30.0, dtype=torch.float64)):
        out = A.apply_op(imgs, op, mag, negate, u)
        ref = pil_batch(imgs, lambda i, im: pil_op(
            im, A.RANDAUG_OPS[int(op[i])][0], float(mag[i]), bool(negate[i]),
            centre=(float(centres[i, 0]), float(centres[i, 1]))))
        assert_close(out, ref, 0, "apply_op")


def test_geometric_directions_and_black_fill():
    img = torch.full((1, 3, 32, 32), 0, dtype=torch.uint8)
    img[0, :, 7, 5] = 255  # one white pixel at x=5, y=7
    white = lambda out: [tuple(p) for p in (out[0, 0] == 255).nonzero().tolist()]  # noqa: E731
    # TranslateX by +v: output x samples input x + 3, so content moves left by 3
    out = A.translate_x(img, torch.tensor([3.0], dtype=torch.float64))
    assert white(out) == [(7, 2)]
    assert white(A.translate_y(img, torch.tensor([-4.0], dtype=torch.float64))) == [(11, 5)]
    # ShearX: output (x, y) samples input (x + v y, y)
    out = A.shear_x(img, torch.tensor([0.5], dtype=torch.float64))
    assert all(x + 0.5 * (y + 0.5) + 0.5 >= 5 and x + 0.5 * (y + 0.5) + 0.5 < 6 for y, x in white(out))
    # PIL rotates counter-clockwise for positive angles: a pixel right of the centre goes up
    right = torch.zeros(1, 3, 32, 32, dtype=torch.uint8)
    right[0, :, 16, 28] = 255
    assert white(A.rotate(right, torch.tensor([90.0], dtype=torch.float64))) == [(3, 16)]
    # and each of these agrees with PIL (rotate(90) takes PIL's transpose shortcut)
    cases = [(A.translate_x, img, 3.0, lambda im: im.transform((32, 32), Image.AFFINE, (1, 0, 3.0, 0, 1, 0))),
             (A.shear_x, img, 0.5, lambda im: im.transform((32, 32), Image.AFFINE, (1, 0.5, 0, 0, 1, 0))),
             (A.rotate, right, 90.0, lambda im: im.rotate(90.0))]
    for fn, x, v, ref in cases:
        assert_close(fn(x, torch.tensor([v], dtype=torch.float64)), from_pil(ref(to_pil(x[0])))[None], 0)
    # black fill: a big translation of a white image leaves exact zeros behind
    full = torch.full((2, 3, 32, 32), 255, dtype=torch.uint8)
    out = A.translate_x(full, torch.tensor([16.0, -16.0], dtype=torch.float64))
    assert (out[0, :, :, 16:] == 0).all() and (out[0, :, :, :16] == 255).all()
    assert (out[1, :, :, :16] == 0).all() and (out[1, :, :, 16:] == 255).all()
    out = A.rotate(full, torch.tensor([45.0, -30.0], dtype=torch.float64))
    assert (out[:, :, 0, 0] == 0).all() and (out[:, :, 16, 16] == 255).all()


# ------------------------------------------------------------------------- step 5, whole


@pytest.mark.parametrize("k", [1, 2])
def test_boosted_randaugment_replayed_through_pil(imgs, k):
    n = len(imgs)
    weight = torch.rand(n, generator=gen(14), dtype=torch.float64) * 0.6 + 0.4
    magnitude = 5 + 25 * torch.rand(n, generator=gen(15), dtype=torch.float64)
    out, p = A.boosted_randaugment_with_params(imgs, weight, magnitude, k, gen(16))
    centres = cutout_centres(p["cutout_u"])

    def replay(i, im):
        for r in range(k):
            if p["applied"][r, i]:
                im = pil_op(im, A.RANDAUG_OPS[int(p["op"][r, i])][0], float(magnitude[i]), bool(p["negate"][r, i]),
                            centre=(float(centres[r, i, 0]), float(centres[r, i, 1])))
        return im

    assert_close(out, pil_batch(imgs, replay), 0, f"RandAugment k={k}")
    assert p["applied"].any() and (~p["applied"]).any()


def test_randaug_draws_probabilities():
    n = 30000
    weight = torch.full((n,), 0.3, dtype=torch.float64)
    weight[: n // 3] = 0.0
    weight[n // 3: 2 * n // 3] = 1.0
    p = A.draw_randaug_params(n, 2, weight, gen(17))
    assert not p["applied"][:, : n // 3].any() and p["applied"][:, n // 3: 2 * n // 3].all()
    rest = p["applied"][:, 2 * n // 3:].double()
    m = rest.numel()
    assert abs(rest.mean().item() - 0.3) < 5 * math.sqrt(0.21 / m)
    # the two rounds are independent draws
    both = (rest[0] * rest[1]).mean().item()
    assert abs(both - 0.09) < 5 * math.sqrt(0.09 * 0.91 / rest.shape[1])
    # ops uniform over all 15, signs fair, Cutout u in [0, 1)
    counts = torch.bincount(p["op"].flatten(), minlength=15).double()
    expected = 2 * n / 15
    assert counts.numel() == 15 and (counts - expected).abs().max() < 5 * math.sqrt(expected)
    assert abs(p["negate"].double().mean().item() - 0.5) < 5 * math.sqrt(0.25 / (2 * n))
    assert p["cutout_u"].min() >= 0 and p["cutout_u"].max() < 1
    c = cutout_centres(p["cutout_u"])
    assert c.min() > 1.0 and c.max() <= 32.0


def test_weight_zero_is_identity_and_weight_one_changes(imgs):
    n = len(imgs)
    mag = torch.full((n,), 30.0)
    out = A.boosted_randaugment(imgs, torch.zeros(n), mag, 2, gen(18))
    assert torch.equal(out, imgs)
    out = A.boosted_randaugment(imgs, torch.ones(n), mag, 1, gen(18))
    assert (out != imgs).flatten(1).any(1).float().mean() > 0.8


# ------------------------------------------------------------------------- general properties


def test_seeded_generator_is_deterministic(imgs):
    x = imgs[:64]
    w, m = torch.full((64,), 0.7), torch.full((64,), 20.0)
    assert torch.equal(A.simclr_augment(x, gen(0)), A.simclr_augment(x, gen(0)))
    assert not torch.equal(A.simclr_augment(x, gen(0)), A.simclr_augment(x, gen(1)))
    assert torch.equal(A.boosted_randaugment(x, w, m, 2, gen(0)), A.boosted_randaugment(x, w, m, 2, gen(0)))
    assert not torch.equal(A.boosted_randaugment(x, w, m, 2, gen(0)), A.boosted_randaugment(x, w, m, 2, gen(1)))
    out = A.simclr_augment(x, gen(0))
    assert out.dtype == torch.uint8 and out.shape == x.shape


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def test_no_per_sample_python_loop(imgs):
    """The number of tensor ops dispatched does not depend on the batch size."""
    counts = []
    for n in (4, 4, 64):  # the first run only warms the per-device constant cache
        x = imgs[:n]
        with _CountOps() as c:
            A.simclr_augment(x, gen(0))
            A.boosted_randaugment(x, torch.full((n,), 0.5), torch.full((n,), 20.0), 2, gen(0))
        counts.append(c.count)
    assert counts[1] == counts[2], counts


def test_op_budget(imgs):
    """On a GPU the pipelines are bound by kernel count, not arithmetic: a guard against a
    change that quietly multiplies the ops (apply_simclr was 881, apply_randaug k=2 980,
    before hue ran once per batch and the round parameters were vectorised)."""
    n = 16
    x = imgs[:n]
    params = A.draw_simclr_params(n, gen(0))
    rounds = A.draw_randaug_params(n, 2, torch.full((n,), 0.5), gen(1))
    A.apply_simclr(x, params)  # warm the per-device constant cache
    with _CountOps() as simclr:
        A.apply_simclr(x, params)
    with _CountOps() as randaug:
        A.apply_randaug(x, torch.full((n,), 20.0), rounds)
    assert simclr.count <= 560 and randaug.count <= 760, (simclr.count, randaug.count)


def test_rejects_non_uint8(imgs):
    with pytest.raises(ValueError):
        A.simclr_augment(imgs.float(), gen(0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(imgs):
    """Same parameters on CUDA and CPU give identical uint8 results (the PIL-exactness
    relies on IEEE division and no fused multiply-adds, which CUDA must honour too)."""
    dev = torch.device("cuda")
    n = len(imgs)
    x, xc = imgs, imgs.to(dev)
    p = A.draw_simclr_params(n, gen(20))
    pc = {k: v.to(dev) for k, v in p.items()}
    assert torch.equal(A.apply_simclr(x, p), A.apply_simclr(xc, pc).cpu())
    for hue in (-0.1, 0.0, 0.07):
        ours_gpu = A.adjust_hue(xc, torch.full((n,), hue, device=dev)).cpu()
        assert torch.equal(A.adjust_hue(x, torch.full((n,), hue)), ours_gpu)
    mag = 30 * torch.rand(n, generator=gen(21), dtype=torch.float64)
    for k in (1, 2):
        q = A.draw_randaug_params(n, k, torch.ones(n), gen(22))
        qc = {key: v.to(dev) for key, v in q.items()}
        assert torch.equal(A.apply_randaug(x, mag, q), A.apply_randaug(xc, mag.to(dev), qc).cpu())
    op = torch.arange(n) % 15
    for m in MAGNITUDES:
        mm = torch.full((n,), m, dtype=torch.float64)
        neg, u = torch.arange(n) % 3 == 0, torch.rand(n, 2, generator=gen(23), dtype=torch.float64)
        assert torch.equal(A.apply_op(x, op, mm, neg, u),
                           A.apply_op(xc, op.to(dev), mm.to(dev), neg.to(dev), u.to(dev)).cpu()), m
    # the public entry points replay a CUDA graph per batch shape: same bits as eager,
    # fresh inputs every call (static buffers refilled), partial batches too
    g = torch.Generator(device=dev).manual_seed(0)
    weight, magc = torch.rand(n, device=dev), mag.to(dev)
    for batch in (xc, xc.flip(0), xc[:37], xc):
        out, p = A.simclr_augment_with_params(batch, g)
        assert out.device.type == "cuda" and out.dtype == torch.uint8
        assert torch.equal(out, A.apply_simclr(batch, p))
        m = magc[: len(batch)]
        out2, q = A.boosted_randaugment_with_params(out, weight[: len(batch)], m, 2, g)
        assert torch.equal(out2, A.apply_randaug(out, m, q))
