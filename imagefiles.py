"""Image files as cameras, phones and scanners write them: find them, open them as a viewer shows them.

* ``find_images(args) -> [(path, picture name)]``: files, folders (recursively, files whose
  extension is in ``IMAGE_EXTENSIONS``, sorted, named by their path inside the folder) and globs
  (``**`` recursive), each file once, in order. A missing argument, a glob without a match or two
  files with one picture name are errors naming them, raised before any work.
* ``open_image(path) -> PIL.Image`` (8-bit RGB, decoded now). Every PIL mode: 16-bit and 32-bit
  integer greys (``I;16``, ``I``) scaled from their range to 8 bits, float greys (``F``) from
  [0, 1] (or 0-255), transparency (``RGBA``, ``LA``, palettes with a transparent colour) composited
  over white as a viewer shows it, ``CMYK``/``YCbCr``/``1``/``P`` converted by PIL. EXIF
  orientation applied (``ImageOps.exif_transpose``), so boxes are in the frame a viewer shows.
  Up to 2x ``PIL.Image.MAX_IMAGE_PIXELS`` pixels (179 MP by default: a 12,000 x 9,000 photo is
  108 MP) is read, and the model's own resize brings it down; above that the file is refused as a
  possible decompression bomb (PIL's ``DecompressionBombError``). Errors: FileNotFoundError for
  a missing file, ValueError naming the file and PIL's reason for anything else.
* ``to_rgb(image)``: the same conversion for an image already open.
* ``to_pil(image)``: what the Python API takes: a path (``open_image``), a PIL image
  (``to_rgb``), a NumPy array [H, W(, 1|3|4)] or a tensor [1|3, H, W], uint8 (0-255) or float in
  [0, 1] (torchvision's convention); anything else is an error saying what is accepted.
"""
from __future__ import annotations

import glob
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
                    ".pgm", ".pbm", ".pnm"}


def find_images(args: list[str]) -> list[tuple[Path, str]]:
    """``--images`` arguments -> [(file, picture name)] in order, each file once.

    A folder gives its files with an image extension, recursively and sorted, named by their path
    inside it; a glob (quoted, so that the shell leaves it) its matches; a file itself, named by
    its stem. A missing argument, or two pictures of one name, is an error before any work."""
    found: dict[Path, tuple[Path, str]] = {}  # resolved path -> (path as given, picture name)
    for arg in args:
        path = Path(arg)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
            pairs = [(f, f.relative_to(path).with_suffix("").as_posix()) for f in files]
        elif path.is_file():
            pairs = [(path, path.stem)]
        elif glob.has_magic(arg):
            matches = sorted(Path(m) for m in glob.glob(arg, recursive=True))
            pairs = [(m, m.stem) for m in matches if m.is_file() and m.suffix.lower() in IMAGE_EXTENSIONS]
            if not pairs:
                raise FileNotFoundError(f"--images '{arg}': no image file matches")
        else:
            raise FileNotFoundError(f"image '{arg}' not found")
        for f, name in pairs:
            found.setdefault(f.resolve(), (f, name))
    by_name: dict[str, Path] = {}
    for path, name in found.values():
        if name in by_name:
            raise ValueError(f"--images: '{by_name[name]}' and '{path}' would both be drawn to "
                             f"<out>/{name}.png; rename one, or pass their folder instead")
        by_name[name] = path
    return list(found.values())


def to_rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB as a viewer shows the image (header: modes, EXIF orientation, transparency)."""
    im = ImageOps.exif_transpose(im)  # phones store the sensor's frame plus an orientation tag
    if im.mode.startswith("I") or im.mode == "F":  # 16/32-bit or float grey: convert() would clip
        a = np.asarray(im, dtype=np.float32)
        top = 65535.0 if im.mode.startswith("I;16") or a.max(initial=0) > 255 else 255.0
        if im.mode == "F" and a.max(initial=0) <= 1:
            top = 1.0
        im = Image.fromarray((a.clip(0, top) * (255 / top)).round().astype(np.uint8))
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):  # transparent pixels show the page: white
        im = Image.alpha_composite(Image.new("RGBA", im.size, "white"), im.convert("RGBA"))
    return im.convert("RGB")


def open_image(path) -> Image.Image:
    """A file as ``to_rgb``; a missing file is a FileNotFoundError, anything PIL refuses a
    ValueError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image '{path}' not found")
    try:
        with warnings.catch_warnings():
            # PIL warns above MAX_IMAGE_PIXELS and refuses above twice that; in between (a 108 MP
            # photo) the model's resize brings it down, so the warning says nothing actionable
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                return to_rgb(im)  # decodes now: a truncated file fails here, not in the model
    except Image.DecompressionBombError as e:
        raise ValueError(f"'{path}' is refused as a possible decompression bomb ({e}); if you "
                         f"trust the file, raise PIL.Image.MAX_IMAGE_PIXELS before loading it") from None
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for broken files
        raise ValueError(f"'{path}' is not an image file PIL can read ({type(e).__name__}: {e})") from None


def to_pil(image) -> Image.Image:
    """An RGB PIL image from a path, a PIL image, a NumPy array [H, W(, 1|3|4)] or a tensor
    [1|3, H, W]; arrays and tensors are uint8 (0-255) or float in [0, 1] (torchvision's convention)."""
    if isinstance(image, (str, Path)):
        return open_image(image)
    if isinstance(image, Image.Image):
        return to_rgb(image)
    if isinstance(image, torch.Tensor):
        if image.dim() != 3 or image.shape[0] not in (1, 3):
            raise ValueError(f"an image tensor must be [3, H, W] (or [1, H, W]), got {list(image.shape)}")
        image = image.detach().cpu().permute(1, 2, 0).numpy()  # (H, W, 3)
    if isinstance(image, np.ndarray):
        if image.ndim == 3 and image.shape[2] == 1:
            image = image[..., 0]  # (H, W)
        if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (3, 4)):
            raise ValueError(f"an image array must be [H, W] or [H, W, 3], got {list(image.shape)}")
        if np.issubdtype(image.dtype, np.integer) and image.size and 0 <= image.min() <= image.max() <= 255:
            image = image.astype(np.uint8)  # e.g. int64 0-255 from arithmetic on a uint8 picture
        if image.dtype != np.uint8:
            if image.size and (image.min() < 0 or image.max() > 1):
                raise ValueError(f"a {image.dtype} image must hold floats in [0, 1] or integers in "
                                 f"0-255, got values in [{image.min():.3g}, {image.max():.3g}]")
            image = (image * 255).round().astype(np.uint8)
        return Image.fromarray(image).convert("RGB")
    raise TypeError(f"cannot read an image from a {type(image).__name__}; give a path, a PIL image, "
                    f"a NumPy array or a tensor")
