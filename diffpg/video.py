"""Videos of a policy, drawn with matplotlib and written as an animated GIF (offline, no CDN).

Each env draws itself (its ``frame_drawer``, ``diffpg.envs.drawing``): the analytic envs from
their raw state, the physics engines' as a side view of their bodies; any other env as its
state's phase plane. One environment is simulated for one episode with the deterministic
policy.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import numpy as np

from diffpg.acting import unroll
from diffpg.envs import drawing
from diffpg.envs.core import SettingError
from diffpg.folders import atomic_path, check_file_size_limit, check_file_writable
from diffpg.normalization import RunningStatistics
from diffpg.options import seed_key
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
    heading = f"{drawing.drawable_text(title)}\n" if title else ""
    images = []
    try:
        for index in tqdm(range(0, len(positions), every), desc="video", unit="frame",
                          file=sys.stderr, disable=not progress):
            axis.clear()
            drawer(axis, positions[index])
            axis.set_title(f"{heading}step {index}  return {returns[index]:.1f}", fontsize=9)
            figure.canvas.draw()
            images.append(Image.fromarray(np.asarray(figure.canvas.buffer_rgba())).convert("RGB"))
    finally:
        plt.close(figure)
    images[0].save(path, format="GIF", save_all=True, append_images=images[1:],
                   duration=int(1000 / fps), loop=0, comment=GIF_COMMENT)
    return path


def _drawer(env, positions: np.ndarray):
    """A function ``(axis, positions_t)`` drawing one frame of ``env``: the env's own
    ``frame_drawer`` (``diffpg.envs.drawing``), else its state's phase plane."""
    raw = getattr(env, "unwrapped", env)  # the env inside TimeLimitAutoReset
    frame_drawer = getattr(raw, "frame_drawer", None)
    return frame_drawer(positions) if frame_drawer is not None else drawing.phase_plane(positions)


GIF_COMMENT = b"drawn by diffpg video"
"""The comment of every GIF diffpg writes: an existing --out without it is a file diffpg did not
write, which a video does not replace."""
GIF_FRAME_BYTES_AT_LEAST = 2048
"""Fewer bytes than any frame of ours takes in a GIF (a 480 x 360 drawing compresses to about
5 KB): frames x this is a lower bound of the file, checked against the file-size limit before
anything is drawn."""


def video_of_run(run_dir: Path, out: Path | None = None, every: int = 1, seed_index: int = 0,
                 episode_seed: int = 0) -> Path:
    """A GIF of the latest checkpoint of training run ``run_dir`` (deterministic policy; the
    seed ``seed_index`` of a multi-seed run)."""
    from diffpg.run_files import load_settings
    from diffpg.runs import load_run

    if out is None:  # the GIF goes beside the run: the run first, so that errors name it
        load_settings(run_dir)
    elif (Path(out).exists() or Path(out).is_symlink()) and not Path(out).is_dir() and not (
            Path(out).is_file() and _drawn_by_diffpg(Path(out))):  # (a run's policy.gif is ours)
        what = ("a file that is not a GIF diffpg drew" if Path(out).is_file()
                else "a FIFO, a device or a link (not a GIF)")
        raise SettingError(f"out={str(out)!r} is {what}, which a video does not replace; "
                           "choose another --out, or remove it")
    out = check_video_path(out or run_dir / "policy.gif")
    trainer, state = load_run(run_dir, seed_index, eval_envs=1)  # (one episode is drawn)
    frames = -(-trainer.env.episode_length // every)
    check_file_size_limit(frames * GIF_FRAME_BYTES_AT_LEAST, f"a GIF of {frames} frames",
                          "draw fewer frames (--every)", bound="at least")
    positions, rewards = episode_states(
        trainer.env, trainer.policy, state.params, state.obs_stats,
        seed_key(episode_seed), trainer.env.episode_length)
    settings = trainer.settings
    title = (f"{settings.env} ({settings.estimator}), {Path(run_dir).resolve().name}"
             + (f" seed {seed_index}" if settings.seeds > 1 else "")
             + f", update {int(np.ravel(state.update)[0])}")
    with atomic_path(out) as temporary:  # a stopped save leaves the earlier GIF, if any
        save_gif(trainer.env, positions, rewards, temporary, every=every, title=title,
                 progress=True)
    return out


def _drawn_by_diffpg(path: Path) -> bool:
    """Whether ``path`` is a GIF whose comment is ``GIF_COMMENT``."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.info.get("comment") == GIF_COMMENT
    except (OSError, ValueError, SyntaxError):  # (not an image Pillow reads)
        return False


def check_video_path(out: Path) -> Path:
    """``out`` if a GIF can be written there, checked before any work; else one line naming
    ``--out``."""
    out = Path(out)
    if out.is_dir():
        raise SettingError(f"out={str(out)!r} is a folder; give a file name ending in .gif")
    if out.name.lower() == ".gif":
        raise SettingError(f"out={str(out)!r} needs a name before .gif (e.g. policy.gif)")
    if out.suffix.lower() != ".gif":
        raise SettingError(f"out={str(out)!r} must end in .gif (the only format written)")
    if not out.parent.is_dir():
        raise SettingError(f"out={str(out)!r}: its folder {str(out.parent)!r} does not exist "
                           "(or is a file); create it or choose another --out")
    check_file_writable(out)
    return out
