"""Layouts (`Layout`, part of the IR) and their arithmetic on shapes (no tensors): sizes of axes, the shape of each
part, the fused shape.

A layout dim is a product of factors; at most one factor per dim may be unknown and is then inferred from a
concrete shape. The parts bracket contributes the extent of one part (when looking at that part's tensor) or
the sum of all parts (when looking at the fused tensor).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

BRACKET = "[]"  # the factor name of the parts bracket inside a layout dim


@dataclass(frozen=True, slots=True)
class Layout:
    """Factored dims of the Megatron tensor. `dims[k]` lists factor names, outermost first; `BRACKET` marks
    the parts. `sizes` holds the axis sizes known from the spec (others are inferred from tensors, one per dim)."""

    dims: tuple[tuple[str, ...], ...]
    sizes: tuple[tuple[str, int], ...]
    parts: tuple[tuple[str, int], ...]  # (part, its extent along the bracket factor)
    text: str = ""

    def size(self, axis: str) -> int | None:
        return dict(self.sizes).get(axis)

    @property
    def part_names(self) -> tuple[str, ...]:
        return tuple(p for p, _ in self.parts)


class LayoutError(ValueError):
    pass


def _factor_size(layout: Layout, factor: str, part: str | None, sizes: dict) -> int | None:
    if factor == BRACKET:
        extents = dict(layout.parts)
        return extents[part] if part is not None else sum(extents.values())
    return sizes.get(factor)


def infer_sizes(layout: Layout, shape: tuple[int, ...], part: str | None = None) -> dict[str, int]:
    """Axis sizes of `layout` given the concrete `shape` of the fused tensor (part None) or of one part."""
    if len(shape) != len(layout.dims):
        raise LayoutError(f"layout '{layout.text}' has {len(layout.dims)} dims, tensor has shape {tuple(shape)}")
    sizes = dict(layout.sizes)
    for dim, extent in zip(layout.dims, shape):
        known = [_factor_size(layout, f, part, sizes) for f in dim]
        unknown = [f for f, k in zip(dim, known) if k is None]
        product = math.prod(k for k in known if k is not None)
        if len(unknown) > 1:
            raise LayoutError(f"layout '{layout.text}': axes {unknown} of one dim are both unknown")
        if unknown:
            if product == 0 or extent % product:
                raise LayoutError(f"layout '{layout.text}': dim of size {extent} is not divisible by {product}")
            sizes[unknown[0]] = extent // product
        elif product != extent:
            raise LayoutError(f"layout '{layout.text}' expects a dim of size {product}, tensor has {extent} "
                              f"(shape {tuple(shape)})")
    return sizes


def factored_shape(layout: Layout, sizes: dict, part: str | None = None) -> tuple[int, ...]:
    """The shape with every dim split into its factors (the view fuse, split and shard work on)."""
    return tuple(_factor_size(layout, f, part, sizes) for dim in layout.dims for f in dim)


def shape_of(layout: Layout, sizes: dict, part: str | None = None) -> tuple[int, ...]:
    """The concrete shape of one part (or of the fused tensor when `part` is None)."""
    return tuple(math.prod(_factor_size(layout, f, part, sizes) for f in dim) for dim in layout.dims)


def bracket_position(layout: Layout) -> int | None:
    """Index of the parts bracket within the factored shape."""
    flat = [f for dim in layout.dims for f in dim]
    return flat.index(BRACKET) if BRACKET in flat else None


def axis_position(layout: Layout, axis: str) -> int:
    flat = [f for dim in layout.dims for f in dim]
    return flat.index(axis)


def dim_of_axis(layout: Layout, axis: str) -> int:
    return next(k for k, dim in enumerate(layout.dims) if axis in dim)


def split_shapes(layout: Layout, shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """The shape of every part of a tensor of `shape` split by `layout` (an HF-side layout)."""
    sizes = infer_sizes(layout, shape)
    return {part: shape_of(layout, sizes, part) for part in layout.part_names}


def part_rows(layout: Layout, shape: tuple[int, ...]) -> dict[str, tuple[int, int]] | None:
    """Where each part of a tensor of `shape` split by `layout` lies as one block of rows `[start, stop)`: when
    the parts bracket is the outermost factor of dim 0 (`([q: a | k: b | v: b]) h`); None otherwise."""
    if not layout.dims or not layout.dims[0] or layout.dims[0][0] != BRACKET:
        return None
    sizes = infer_sizes(layout, shape)
    inner = math.prod(sizes[f] for f in layout.dims[0][1:])
    rows, start = {}, 0
    for part, extent in layout.parts:
        rows[part] = (start * inner, (start + extent) * inner)
        start += extent
    return rows
