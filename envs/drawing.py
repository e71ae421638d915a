"""Drawing one frame of an episode with matplotlib, for ``diffpg video``.

An environment that knows how it looks has a method ``frame_drawer(positions)``: given what
``diffpg.video`` recorded at each step of one episode (``positions [T + 1, ...]``: the raw
state of an analytic env, ``body_segments`` of a physics engine's bodies), it returns
``draw(axis, positions_t)``, which draws the frame of one step on a matplotlib axis. An env
without one is drawn as ``phase_plane``. matplotlib is imported only when a frame is drawn.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

Drawer = Callable[[Any, np.ndarray], None]
"""``draw(axis, positions_t)``: one frame on a matplotlib axis."""


def square(axis, half_width: float, centre: tuple[float, float]) -> None:
    """Equal-aspect limits of ``half_width`` around ``centre``."""
    axis.set(xlim=(centre[0] - half_width, centre[0] + half_width),
             ylim=(centre[1] - half_width, centre[1] + half_width), aspect="equal")


def box(axis, centre_x: float, width: float, height: float) -> None:
    """A grey box (a cart) of ``width`` x ``height`` centred at ``(centre_x, 0)``."""
    from matplotlib.patches import Rectangle

    axis.add_patch(Rectangle((centre_x - width / 2, -height / 2), width, height,
                             color="tab:grey"))


def side_view(positions: np.ndarray, parents: Sequence[int] | None) -> Drawer:
    """Bodies seen from the side (x, z), ``positions [T + 1, links, (origin, far end), 3]``:
    each link a rod from its frame origin through its centre of mass, a dotted line to its
    parent (``parents[link]``, -1: the world), the view following the root body."""
    extent = 1.2 * max(float(np.ptp(positions[..., 2])), 1.0)

    def draw(axis, pos):
        x, z = pos[..., 0], pos[..., 2]  # [links, 2]
        for link in range(pos.shape[0]):
            axis.plot(x[link], z[link], "-", color="tab:blue", lw=4, solid_capstyle="round")
            if parents is not None and parents[link] >= 0:
                parent = parents[link]
                axis.plot([x[parent, 0], x[link, 0]], [z[parent, 0], z[link, 0]], ":",
                          color="grey", lw=1)
        axis.plot(x[:, 0], z[:, 0], "o", color="tab:red", ms=4)
        axis.axhline(0.0, color="grey", lw=1)
        centre = x[0, 0]
        axis.set(xlim=(centre - extent, centre + extent), ylim=(-0.2 * extent, 1.4 * extent),
                 aspect="equal", xlabel="x", ylabel="z")

    return draw


def phase_plane(positions: np.ndarray) -> Drawer:
    """Any state vector: its first two coordinates (a 1-D state gets y = 0), the episode's path
    in grey and the step's point in red."""
    plane = np.c_[positions, np.zeros(len(positions))][:, :2]

    def draw(axis, x):
        axis.plot(plane[:, 0], plane[:, 1], "-", color="lightgrey")
        axis.plot([plane[0, 0]], [plane[0, 1]], ".", color="grey")
        point = np.r_[x, 0.0][:2]
        axis.plot([point[0]], [point[1]], "o", color="tab:red", ms=10)
        axis.plot([0], [0], "+", color="black", ms=12)
        axis.set(xlabel="x[0]", ylabel="x[1]")

    return draw


def drawable_text(text: str) -> str:
    """``text`` with each character matplotlib's default font has no glyph for (a run folder
    named in a script the font lacks, an emoji) replaced by "?": matplotlib would draw an empty
    box and print a warning for each."""
    from matplotlib import font_manager

    font = font_manager.get_font(font_manager.findfont(font_manager.FontProperties()))
    return "".join(c if c.isspace() or font.get_char_index(ord(c)) else "?" for c in text)
