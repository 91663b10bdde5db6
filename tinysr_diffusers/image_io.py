"""Image files <-> arrays and PIL images, for `tinysr upscale` and the demo.

Reading decodes the whole file (a truncated one fails here, not in the pipeline), applies its EXIF orientation and
converts an ICC profile to sRGB, the space the model works in. PIL truncates 16-bit colour to 8 bits, so more-than-8-bit
PNG and TIFF files are read by OpenCV and tifffile into uint16 arrays, and written back at 16 bits the same way.
Outputs are written through a temporary file beside the target, so no partial file is ever left.

Only numpy and PIL are imported with the module (`tinysr --help` imports it); OpenCV and tifffile load when a 16-bit
file is read or written.
"""

import io
import re
import warnings
from pathlib import Path
from typing import Optional, Union

import numpy as np
import PIL.Image
import PIL.ImageOps


OUTPUT_FORMATS = {"png": "PNG", "webp": "WEBP", "jpg": "JPEG", "tiff": "TIFF"}  # file extension -> PIL format
DEEP_FORMATS = ("png", "tiff")  # the output formats that keep 16 bits per sample
# PIL format -> (module, package) that reads and writes it at 16 bits (PIL keeps only 8 bits of 16-bit colour).
SIXTEEN_BIT_CODECS = {"PNG": ("cv2", "opencv-python-headless"), "TIFF": ("tifffile", "tifffile")}
# EXIF orientation -> the numpy transform of an (H, W, ...) array that PIL.ImageOps.exif_transpose applies.
EXIF_TRANSFORMS = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.swapaxes(0, 1),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: a[::-1, ::-1].swapaxes(0, 1),
    8: lambda a: np.rot90(a),
}
# Raw modes of more than 8 bits per sample (I;16B, RGB;16B, RGBA;16L, ...; not BMP's packed 5-6-5 BGR;16).
SIXTEEN_BIT_RAWMODE = re.compile(r"I;16|;16[A-Z]")
# The ICC colour space of each PIL mode that a profile can describe.
MODE_SPACES = {
    "1": "GRAY",
    "L": "GRAY",
    "LA": "GRAY",
    "I;16": "GRAY",
    "I;16B": "GRAY",
    "I;16L": "GRAY",
    "RGB": "RGB",
    "RGBA": "RGB",
    "RGBX": "RGB",
    "P": "RGB",
    "PA": "RGB",
    "CMYK": "CMYK",
}


# ------------------------------------------------------------------------------------------------------- reading
def read_image(
    path: Path, deep: bool = False, *, alpha: bool = True
) -> tuple[Union[PIL.Image.Image, np.ndarray], list[str]]:
    """Open and fully decode an image (so truncated files fail here), applying its EXIF orientation and converting
    it to sRGB; returns it and warnings (PIL's, and what the one-frame output cannot keep; without `alpha`, that the
    output format drops its transparency).

    With `deep` (the output format keeps 16 bits), a file of more than 8 bits per sample comes back as a uint16
    numpy array (H, W[, C]) in RGB(A) order, read by OpenCV (PNG) or tifffile (TIFF) because PIL truncates 16-bit
    colour to 8 bits; otherwise as a PIL image, with a warning that the output is 8-bit.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with PIL.Image.open(path) as image:
            bits = _bits_per_sample(image)  # before load(), which drops the tiles
            frames = getattr(image, "n_frames", 1)
            image_format = image.format
            orientation = image.getexif().get(0x0112, 1)  # before load(), which applies and drops a TIFF's
            image.load()
            image = PIL.ImageOps.exif_transpose(image)
    notes = [" ".join(str(warning.message).split()) for warning in caught]
    if not alpha and (image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info):
        notes.append("it has transparency, which the output format cannot keep: the alpha channel is dropped")
    if frames > 1:
        notes.append(f"it has {frames} frames (animated or multi-page): only the first is upscaled")
    if bits > 8:
        reason = _deep_problem(image, image_format) if deep else None
        array = _read_16_bit(path, image_format, orientation) if deep and not reason else None
        if array is not None:
            return array, notes
        notes.append(f"{bits}-bit input: the output is 8-bit" + (f" ({reason})" if reason else ""))
    return _to_srgb(image, notes), notes


def codec_problem(image_format: str) -> Optional[str]:
    """Why 16-bit `image_format` ("PNG" or "TIFF") files cannot be read or written here (its codec is not
    installed), or None if they can."""
    module, package = SIXTEEN_BIT_CODECS[image_format]
    try:
        __import__(module)
    except ImportError:
        return f"install {package} to keep 16 bits"
    return None


def _deep_problem(image: PIL.Image.Image, image_format: Optional[str]) -> Optional[str]:
    """Why a more-than-8-bit input cannot give a 16-bit output (None if it can)."""
    if image_format not in SIXTEEN_BIT_CODECS:
        return f"16-bit {image_format} files are read at 8 bits; PNG and TIFF keep 16"
    if image.info.get("icc_profile"):
        return "its ICC profile is converted to sRGB in 8 bits"
    return codec_problem(image_format)


def _read_16_bit(path: Path, image_format: str, orientation: int) -> Optional[np.ndarray]:
    """The first image of a 16-bit PNG or TIFF as uint16 (H, W[, C]) RGB(A), EXIF-oriented as PIL orients the 8-bit
    image; None if it is stored at another depth or the reader fails (the caller then falls back to 8 bits)."""
    if image_format == "TIFF":
        import tifffile

        with tifffile.TiffFile(path) as tiff:
            page = tiff.pages[0]
            array = page.asarray()
            if page.planarconfig == tifffile.PLANARCONFIG.SEPARATE and array.ndim == 3:
                array = np.moveaxis(array, 0, -1)
    else:
        import cv2

        array = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)  # BGR(A); ignores the EXIF orientation
        if array is not None and array.ndim == 3 and array.shape[-1] in (3, 4):
            array = array[..., [2, 1, 0, 3][: array.shape[-1]]]
    if array is None or array.dtype != np.uint16 or array.ndim not in (2, 3):
        return None
    if array.ndim == 3 and array.shape[-1] not in (1, 3, 4):
        return None
    return np.ascontiguousarray(EXIF_TRANSFORMS.get(orientation, lambda a: a)(array))


def _bits_per_sample(image: PIL.Image.Image) -> int:
    """Bits per sample of the file: PIL decodes 16-bit RGB(A) to 8 bits, which only the raw mode of its tiles shows."""
    if any(SIXTEEN_BIT_RAWMODE.search(str(rawmode)) for rawmode in [image.mode, *(tile[3] for tile in image.tile)]):
        return 16
    return 32 if image.mode in ("I", "F") else 8


def _to_srgb(image: PIL.Image.Image, notes: list[str]) -> PIL.Image.Image:
    """Convert an image with an embedded ICC profile to sRGB, the space the model works in and untagged outputs are
    read in (greyscale stays greyscale, alpha is kept); a profile that cannot be used is reported in `notes` and
    ignored. Outputs carry no profile: copying the input's would tag them with a colour space they are not in."""
    from PIL import ImageCms

    icc = image.info.get("icc_profile")
    if not icc:
        return image
    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        space = profile.profile.xcolor_space.strip()
        if MODE_SPACES.get(image.mode) != space:
            raise ValueError(f"a {space} profile for {image.mode} pixels")
        alpha = None
        if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
            alpha = image.convert("RGBA").getchannel("A")
        colour = image
        if image.mode in ("1", "LA", "P", "PA", "RGBA", "RGBX"):
            colour = image.convert("L" if space == "GRAY" else "RGB")
        converted = ImageCms.profileToProfile(colour, profile, ImageCms.createProfile("sRGB"), outputMode="RGB")
    except (OSError, ValueError, ImageCms.PyCMSError) as error:
        reason = f"{type(error).__name__}: {' '.join(str(error).split()) or type(error).__name__}"
        notes.append(f"ignoring its ICC profile ({reason}); its colours are taken as sRGB")
        return image
    if space == "GRAY":
        converted = converted.convert("L")
    if alpha is not None:
        converted.putalpha(alpha)
    return converted


# ------------------------------------------------------------------------------------------------------- writing
def write_image(
    image: Union[PIL.Image.Image, np.ndarray],
    target: Path,
    image_format: str,
    deep: bool = False,
    *,
    overwrite: bool = True,
) -> None:
    """Write a PIL output, or a pipeline's `output_type="uint16"` array (H, W, C), through a temporary file beside
    `target` (ordinary permissions), so no partial output is ever left. Without `overwrite`, an existing `target`
    (also one another process wrote meanwhile) is kept and `FileExistsError` raised.

    `deep` writes a uint16 array at 16 bits per sample (PNG by OpenCV, TIFF by tifffile) as it is; without it an
    array is written at 8 bits (an 8-bit input upscaled in one call with 16-bit ones).
    """
    from .utils import atomic_path

    if isinstance(image, np.ndarray):
        if image.dtype != np.uint16 or image.ndim not in (2, 3):
            raise ValueError(f"expected a uint16 (H, W[, C]) array, got {image.dtype} of shape {image.shape}")
        array = image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image
        if deep:
            with atomic_path(target, replace=overwrite) as temporary:
                write_16_bit(array, temporary, image_format)
            return
        image = PIL.Image.fromarray((array / 257).round().astype(np.uint8))  # 65535 / 257 = 255
    if image_format == "JPEG" and image.mode in ("RGBA", "LA"):
        image = image.convert("RGB")
    with atomic_path(target, replace=overwrite) as temporary:
        image.save(temporary, format=image_format)


def write_16_bit(array: np.ndarray, path: Union[str, Path], image_format: str) -> None:
    """Write uint16 (H, W[, C]) RGB(A) as a 16-bit PNG or TIFF (zlib-compressed, alpha as unassociated)."""
    problem = codec_problem(image_format)
    if problem:
        raise RuntimeError(problem)
    if image_format == "TIFF":
        import tifffile

        extras = {"extrasamples": ["unassalpha"]} if array.ndim == 3 and array.shape[-1] == 4 else {}
        photometric = "rgb" if array.ndim == 3 else "minisblack"
        tifffile.imwrite(path, array, photometric=photometric, compression="zlib", **extras)
        return
    import cv2

    if array.ndim == 3:
        array = array[..., [2, 1, 0, 3][: array.shape[-1]]]
    ok, encoded = cv2.imencode(".png", array)
    if not ok:
        raise OSError("OpenCV could not encode a 16-bit PNG")
    Path(path).write_bytes(encoded.tobytes())
