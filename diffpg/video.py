"""Videos of a policy, drawn with matplotlib and written as an animated GIF (offline, no CDN).

Analytic envs are drawn from their raw state (pendulum, cart-pole, contact, LQR phase plane);
Brax envs as a side view (x, z) of their bodies, each a rod from its frame origin through its
centre of mass, following the root body. One environment is simulated for one episode with the
deterministic policy.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import numpy as np

from diffpg.acting import unroll
from diffpg.envs.core import SettingError
from diffpg.folders import atomic_path, check_file_size_limit, check_file_writable
from diffpg.normalization import RunningStatistics
from diffpg.policy import Params, Policy


def episode_states(env, policy: Policy, params: Params, obs_stats: RunningStatistics,
                   key: jax.Array, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Simulate one env for ``steps`` steps with the mean action; stops at the first ``done``.

    Returns ``(positions [T+1, ...], rewards [T])``: what ``draw_frame`` needs per step (the raw
    state for analytic envs, body positions ``[links, 3]`` for Brax envs).
    """

    body_segments = getattr(env.unwrapped, "body_segments", None)  # physics engines' bodies

    def positions_of(state):
        if body_segments is None:
            return state.pipeline_state
        return body_segments(state)

    def simulate(start):
        batch = jax.tree.map(lambda x: x[None], start)
        _, transitions, positions = unroll(env, policy, params, obs_stats, batch, key, steps,
                                           deterministic=True, record=positions_of)
        return transitions.reward[:, 0], transitions.done[:, 0], jax.tree.map(
            lambda x: x[:, 0], positions)

    start = env.reset(key)
    rewards, done, positions = jax.jit(simulate)(start)
    # Before an auto-reset the wrapper has already replaced the state: the step that ends the
    # episode returns the next episode's first state, whose frame is dropped.
    positions = np.concatenate([np.asarray(positions_of(start))[None], np.asarray(positions)])
    done = np.asarray(done)
    last = int(np.argmax(done)) if done.any() else steps
    return positions[:last + 1], np.asarray(rewards)[:last + 1]


def save_gif(env, positions: np.ndarray, rewards: np.ndarray, path: Path, fps: int = 30,
             every: int = 1, title: str = "", progress: bool = False) -> Path:
    """Draw every ``every``-th state and write ``path`` (an animated GIF, with Pillow);
    ``title`` heads every frame, ``progress`` shows a progress bar of the frames drawn.

    The file is written once every frame is drawn, and only then: an exception while drawing
    (a Ctrl-C among them) leaves ``path`` untouched and reaches the caller as it was raised."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image
    from tqdm import tqdm

    figure, axis = plt.subplots(figsize=(4.8, 3.6))
    drawer = _drawer(env, positions)
    returns = np.concatenate([[0.0], np.cumsum(rewards)])
    images = []
    try:
        for index in tqdm(range(0, len(positions), every), desc="video", unit="frame",
                          file=sys.stderr, disable=not progress):
            axis.clear()
            drawer(axis, positions[index])
            heading = f"{title}\n" if title else ""
            axis.set_title(f"{heading}step {index}  return {returns[index]:.1f}", fontsize=9)
            figure.canvas.draw()
            images.append(Image.fromarray(np.asarray(figure.canvas.buffer_rgba())).convert("RGB"))
    finally:
        plt.close(figure)
    images[0].save(path, format="GIF", save_all=True, append_images=images[1:],
                   duration=int(1000 / fps), loop=0)
    return path


def _drawer(env, positions: np.ndarray):
    """A function ``(axis, positions_t)`` drawing one frame of ``env``."""
    raw = getattr(env, "unwrapped", env)  # the env inside TimeLimitAutoReset
    kind = type(raw).__name__
    if kind == "PendulumSwingUp":
        length = raw.length

        def draw(axis, x):
            tip = (length * np.sin(x[0]), length * np.cos(x[0]))
            axis.plot([0, tip[0]], [0, tip[1]], "-", color="tab:blue", lw=3)
            axis.plot(*tip, "o", color="tab:red", ms=12)
            _square(axis, 1.3 * length, (0.0, 0.0))
        return draw
    if kind == "CartPoleSwingUp":
        pole = 2.0 * raw.pole_com

        def draw(axis, x):
            cart, theta = x[0], x[2]
            tip = (cart + pole * np.sin(theta), pole * np.cos(theta))
            axis.add_patch(_rectangle(cart, 0.4, 0.2))
            axis.plot([cart, tip[0]], [0, tip[1]], "-", color="tab:blue", lw=3)
            axis.axhline(-0.1, color="grey", lw=1)
            _square(axis, 1.4 * pole, (cart, 0.0))
        return draw
    if kind == "WallContact":
        low = min(float(positions[:, 0].min()), raw.start) - 0.2
        high = raw.wall + 0.3

        def draw(axis, x):
            axis.axvline(raw.wall, color="black", lw=4)
            axis.plot([raw.target], [0], "x", color="tab:green", ms=10)
            axis.plot([x[0]], [0], "o", color="tab:red", ms=14)
            axis.set(xlim=(low, high), ylim=(-0.5, 0.5), yticks=[])
        return draw
    if positions.ndim == 4:  # Brax, MJX: [T, links, (origin, far end), 3]
        parents = np.asarray(raw.link_parents) if hasattr(raw, "link_parents") else None
        extent = 1.2 * max(float(np.ptp(positions[..., 2])), 1.0)

        def draw(axis, pos):
            x, z = pos[..., 0], pos[..., 2]  # [links, 2]: side view
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

    def draw_phase_plane(axis, x):  # any other state vector: its first two coordinates
        plane = np.c_[positions, np.zeros(len(positions))][:, :2]  # a 1-D state gets y = 0
        axis.plot(plane[:, 0], plane[:, 1], "-", color="lightgrey")
        axis.plot([plane[0, 0]], [plane[0, 1]], ".", color="grey")
        point = np.r_[x, 0.0][:2]
        axis.plot([point[0]], [point[1]], "o", color="tab:red", ms=10)
        axis.plot([0], [0], "+", color="black", ms=12)
        axis.set(xlabel="x[0]", ylabel="x[1]")
    return draw_phase_plane


def _square(axis, half_width: float, centre: tuple[float, float]) -> None:
    axis.set(xlim=(centre[0] - half_width, centre[0] + half_width),
             ylim=(centre[1] - half_width, centre[1] + half_width), aspect="equal")


def _rectangle(centre_x: float, width: float, height: float):
    from matplotlib.patches import Rectangle

    return Rectangle((centre_x - width / 2, -height / 2), width, height, color="tab:grey")


GIF_FRAME_BYTES_AT_LEAST = 2048
"""Fewer bytes than any frame of ours takes in a GIF (a 480 x 360 drawing compresses to about
5 KB): frames x this is a lower bound of the file, checked against the file-size limit before
anything is drawn."""


def video_of_run(run_dir: Path, out: Path | None = None, every: int = 1, seed_index: int = 0,
                 episode_seed: int = 0) -> Path:
    """A GIF of the latest checkpoint of training run ``run_dir`` (deterministic policy; the
    seed ``seed_index`` of a multi-seed run)."""
    from diffpg.runs import load_run

    out = check_video_path(out or run_dir / "policy.gif")
    trainer, state = load_run(run_dir, seed_index)
    frames = -(-trainer.env.episode_length // every)
    check_file_size_limit(frames * GIF_FRAME_BYTES_AT_LEAST, f"a GIF of {frames} frames",
                          "draw fewer frames (--every)")
    positions, rewards = episode_states(
        trainer.env, trainer.policy, state.params, state.obs_stats,
        jax.random.PRNGKey(episode_seed), trainer.env.episode_length)
    settings = trainer.settings
    title = (f"{settings.env} ({settings.estimator}), {Path(run_dir).resolve().name}, "
             f"update {int(np.ravel(state.update)[0])}")
    with atomic_path(out) as temporary:  # a stopped save leaves the earlier GIF, if any
        save_gif(trainer.env, positions, rewards, temporary, every=every, title=title,
                 progress=True)
    return out


def check_video_path(out: Path) -> Path:
    """``out`` if a GIF can be written there, checked before any work; else one line naming
    ``--out``."""
    out = Path(out)
    if out.is_dir():
        raise SettingError(f"out={str(out)!r} is a folder; give a file name ending in .gif")
    if out.suffix.lower() != ".gif":
        raise SettingError(f"out={str(out)!r} must end in .gif (the only format written)")
    if not out.parent.is_dir():
        raise SettingError(f"out={str(out)!r}: its folder {str(out.parent)!r} does not exist "
                           "(or is a file); create it or choose another --out")
    check_file_writable(out)
    return out
