"""Data for streaming: images read lazily tile by tile, slide datasets, maps written to disk.

    source = streamc.data.open_slide("slide.tif", level=1,
                                     transform=Transform(mean=(0.485, 0.456, 0.406),
                                                         std=(0.229, 0.224, 0.225)))
    logits = model(source)       # each tile's crop is read on demand; never the whole image

- :mod:`~streamc.data.sources`: :class:`ImageSource` (the protocol), :class:`ArraySource`,
  :class:`SlideSource` (tifffile + zarr, OpenSlide, ``.zarr``, ``.npy``), :class:`Transform`;
- :mod:`~streamc.data.prefetch`: :class:`CropReader`, the next crop read on a thread;
- :mod:`~streamc.data.dataset`: :class:`SlideDataset` and :func:`collate_slides` (torch);
- :mod:`~streamc.data.writers`: :class:`MapWriter`, maps larger than memory written tile by tile.
"""

from streamc.data.sources import (
    ArraySource,
    ImageSource,
    RegionSource,
    SlideError,
    SlideSource,
    SourceBatch,
    Transform,
    is_image_source,
    open_slide,
    region,
)

__all__ = [
    "ArraySource",
    "ImageSource",
    "RegionSource",
    "SlideDataset",
    "SlideError",
    "SlideRow",
    "SlideSource",
    "SourceBatch",
    "Transform",
    "collate_slides",
    "is_image_source",
    "open_slide",
    "region",
]


def __getattr__(name: str):
    # The dataset layer imports torch: load it only when asked for.
    if name in ("SlideDataset", "SlideRow", "collate_slides"):
        from streamc.data import dataset

        return getattr(dataset, name)
    raise AttributeError(f"module 'streamc.data' has no attribute {name!r}")
