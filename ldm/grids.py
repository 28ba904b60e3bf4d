"""Image grids for people to look at: reconstructions beside originals, samples under their prompts."""

from __future__ import annotations

import textwrap

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """N x 3 x H x W in [-1, 1] to N x H x W x 3 uint8."""
    return ((images.detach().float().clamp(-1, 1).cpu() + 1) * 127.5).round().byte().permute(0, 2, 3, 1)


def pair_grid(originals: torch.Tensor, reconstructions: torch.Tensor) -> Image.Image:
    """Originals on the top row, their reconstructions below."""
    rows = [torch.cat(list(to_uint8(t)), dim=1) for t in (originals, reconstructions)]
    return Image.fromarray(torch.cat(rows, dim=0).numpy())


def captioned_grid(pixels: np.ndarray, captions: list[str], columns: int = 4, caption_lines: int = 4) -> Image.Image:
    """Each image (N x H x W x 3 uint8) with its prompt written under it, ``columns`` to a row."""
    side = max(pixels.shape[2], 128)  # small images are scaled up so that their caption fits under them
    font = ImageFont.load_default(size=10)
    text_height = 12 * caption_lines + 4
    rows = -(-len(pixels) // columns)
    grid = Image.new("RGB", (columns * side, rows * (side + text_height)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (image, caption) in enumerate(zip(pixels, captions)):
        x, y = (i % columns) * side, (i // columns) * (side + text_height)
        grid.paste(Image.fromarray(image).resize((side, side), Image.Resampling.NEAREST), (x, y))
        lines = textwrap.wrap(caption, width=max(8, side // 6))[:caption_lines]
        draw.multiline_text((x + 2, y + side + 2), "\n".join(lines), fill="black", font=font, spacing=2)
    return grid
