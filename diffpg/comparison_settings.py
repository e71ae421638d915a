"""What ``diffpg compare`` computes, checked before anything is built: ``CompareSettings``
(the environment, the estimators as specs ``name:key=value,...``, the objective ``J_T``, the
sweep and its points, the sizes), ``EstimatorSpec`` and ``SweepPoint``. Every value is checked
in ``CompareSettings.__post_init__``; a bad one is a ``SettingError`` naming it."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Any, NamedTuple

import tyro

from diffpg import envs, estimators
from diffpg.devices import check_devices
from diffpg.envs.core import SettingError
from diffpg.estimators.base import (
    LARGEST_INT,
    MOST_PASSES,
    check_hidden_sizes,
    check_passes,
    check_positive_int,
)
from diffpg.options import check_not_owned, check_seed, parse_options, parse_spec

SWEEPS = ("none", "horizon", "stiffness", "batch")


class EstimatorSpec(NamedTuple):
    """An estimator name with setting overrides, written ``name`` or ``name:key=value,key=value``
    (values are Python literals)."""

    name: str
    overrides: tuple[tuple[str, Any], ...] = ()

    @property
    def label(self) -> str:
        if not self.overrides:
            return self.name
        return self.name + ":" + ",".join(f"{k}={v}" for k, v in self.overrides)

    @classmethod
    def parse(cls, text: str) -> EstimatorSpec:
        name, overrides = parse_spec(text)
        estimators.registration(name)  # a clear error for an unknown name
        return cls(name, tuple(overrides.items()))


class SweepPoint(NamedTuple):
    value: float
    horizon: int
    env_settings: tuple[tuple[str, Any], ...]
    num_envs: int


COMPARISON_OWNS = {"horizon": "the comparison's --horizon (or its sweep)",
                   "discount": "the comparison's --discount"}
"""Estimator settings the comparison sets itself (its objective J_T), with the option to use."""


@dataclasses.dataclass(frozen=True)
class CompareSettings:
    env: Annotated[str, tyro.conf.arg(
        help="Environment: " + ", ".join(envs.names_in_brief()) + ".")] = envs.DEFAULT_ENV
    backend: str | None = None
    """Brax physics backend; None: the env's measured default."""
    env_options: tuple[str, ...] = ()
    """Environment settings as key=value (e.g. start=0.8 for the contact env)."""
    episode_length: int | None = None
    """Time limit; None: the env's default (at least the largest horizon)."""
    estimators: Annotated[tuple[str, ...], tyro.conf.arg(help=(
        "Estimator specs: name or name:key=value,... (e.g. reinforce:baseline=none or "
        "shac:window=2; a tuple in brackets: shac:critic_hidden_sizes=(32,32)); none given: "
        "every registered estimator. Built in: "
        + ", ".join(estimators.names()) + "."))] = ()
    num_estimates: int = 64
    """K independent estimates per estimator (vmapped)."""
    num_envs: int = 16
    """Start states per estimate (each estimate averages over them)."""
    horizon: int = 16
    """Horizon of the main table (and the largest of the horizon sweep)."""
    discount: float = 0.99
    """gamma, the discount of the objective J = E[sum_t gamma^t r_t]."""
    sweep: str = "horizon"
    """none; horizon: 1, 2, 4, ... up to horizon; stiffness: the contact stiffness of an env
    that has a stiffness setting over stiffnesses at horizon (Suh et al. 2022's empirical
    bias); batch: n trajectories of k steps at a fixed budget n k (batch_budget)."""
    stiffnesses: tuple[float, ...] = (1e1, 1e2, 1e3, 1e4)
    """Contact stiffnesses of the stiffness sweep."""
    batch_budget: int | None = None
    """Env steps per estimate of the batch sweep (n trajectories x k steps at fixed n k);
    None: num_envs * horizon. Points: n = 2, 4, 8, ... with k = budget / n <= episode length."""
    reference: str = "auto"
    """auto (exact on the LQR, else the registered reference estimator), exact, or an estimator
    spec (an unbiased one: its mean over reference_estimates estimates is the reference)."""
    reference_estimates: int | None = None
    """Estimates averaged into the reference gradient (when no exact one exists); None: 16 x
    num_estimates (1,024 at the default 64)."""
    critic_warmup: int | None = None
    """Estimates run before measuring, to fit the critics to the fixed policy; None: 200 x
    num_estimates / 64, rounded up (200 at the default 64)."""
    hidden_sizes: tuple[int, ...] = (32, 32)
    """Hidden layers of the MLP policy (non-LQR envs)."""
    policy_checkpoint: str | None = None
    """A training run folder (diffpg train --out): compare the gradients at its latest policy
    (with its observation statistics) instead of a fresh one; the env must be the run's."""
    policy_seed_index: int = 0
    """Which seed's policy of a --policy-checkpoint run that trained several (0..seeds-1)."""
    policy_update: int | None = None
    """Which checkpoint of the --policy-checkpoint run (its update; default: the newest that
    restores). A comparison records the one it read; --resume reads the same one."""
    devices: int = 1
    """Devices the start states of each estimate are split over (num_envs must divide evenly)."""
    per_step: bool = False
    """Also split the variance of the pathwise (BPTT) and score-function (REINFORCE, leave-one-out)
    gradients by time step on the same rollouts (diffpg.per_step, K = num_estimates), with
    the closed-loop step Jacobians' largest singular values along the trajectory (analytic envs)."""
    seed: int = 0
    """Seed of the policy's initial parameters, the start states and every estimate's keys."""
    estimator_seed: int = 0
    """Another draw of the estimators' own keys (their critics' initialisation and warm-up, and
    their estimates) on the same policy, start states and reference: how far a learned warm-up's
    statistics move between draws (and between CPUs, whose rounding sends a warm-up elsewhere)."""

    def __post_init__(self):
        env_options = parse_options(self.env_options, "env_options")
        check_not_owned(env_options, {"episode_length": "--episode-length",
                                      "backend": "--backend"}, "env_options")
        envs.check(self.env, self.episode_length, self.backend, **env_options)
        check_hidden_sizes("hidden_sizes", self.hidden_sizes)
        if (envs.has_exact_return(self.env) and self.policy_checkpoint is None
                and tuple(self.hidden_sizes) != type(self).__dataclass_fields__["hidden_sizes"].default):
            raise SettingError(f"hidden_sizes={tuple(self.hidden_sizes)}: on env={self.env!r} the "
                               "policy is linear (its exact gradient needs one), with no hidden "
                               "layers; drop --hidden-sizes")
        check_seed("seed", self.seed)
        check_seed("estimator_seed", self.estimator_seed)
        for name in ("num_estimates", "num_envs", "horizon", "reference_estimates"):
            value = getattr(self, name)
            if value is None and name == "reference_estimates":
                continue
            check_positive_int(name, value)
        check_devices(self.devices, self.num_envs)
        if self.devices > 1 and self.sweep == "batch":
            raise SettingError("sweep='batch' changes num_envs per point; allowed with devices=1")
        if self.num_estimates < 2:
            raise SettingError(f"num_estimates={self.num_estimates} must be at least 2 (variance)")
        if self.reference_estimates is not None and self.reference_estimates < 2:
            raise SettingError(f"reference_estimates={self.reference_estimates} must be at least "
                               "2 (the reference's standard error)")
        if self.critic_warmup is not None:
            check_passes("critic_warmup", self.critic_warmup, least=0)
        if self.sweep not in SWEEPS:
            raise SettingError(f"sweep={self.sweep!r} is not allowed; allowed values: {list(SWEEPS)}")
        labels = [EstimatorSpec.parse(text).label for text in self.estimators]
        repeated = sorted({label for label in labels if labels.count(label) > 1})
        if repeated:
            raise SettingError(f"estimators: {repeated[0]} is given twice (each estimator's "
                               "results are keyed by its spec); give it once")
        for text in self.estimators:  # every spec's settings, at every horizon of the sweep
            spec = EstimatorSpec.parse(text)
            check_not_owned(dict(spec.overrides), COMPARISON_OWNS, f"estimator spec {text!r}")
            self._check_spec_at_every_point(spec)
        self._check_reference_spec()
        self._check_sweep_values()
        if self.reference == "exact" and not envs.has_exact_return(self.env):
            exact = [name for name in envs.names_without_simulator()
                     if envs.has_exact_return(name)]
            raise SettingError(f"reference='exact' exists only for an env with an exact return "
                               f"({' or '.join(exact)}), not env={self.env!r}; allowed: auto or "
                               "an unbiased estimator's spec")
        if not 0.0 <= self.discount <= 1.0:
            raise SettingError(f"discount={self.discount} must be in [0, 1]")
        self._check_policy_checkpoint()

    def _check_sweep_values(self) -> None:
        """stiffnesses and batch_budget: given only for their own sweep, each point once."""
        for name, value, sweep in (("stiffnesses", self.stiffnesses, "stiffness"),
                                   ("batch_budget", self.batch_budget, "batch")):
            if self.sweep != sweep and value != type(self).__dataclass_fields__[name].default:
                raise SettingError(f"{name}={value!r} is read only by sweep={sweep!r}, not by "
                                   f"sweep={self.sweep!r}; give --sweep {sweep}, or leave out "
                                   f"--{name.replace('_', '-')}")
        repeated = sorted({s for s in self.stiffnesses if self.stiffnesses.count(s) > 1})
        if repeated:
            raise SettingError(f"stiffnesses: {repeated[0]} is given twice (each is a point of "
                               "the sweep); give it once")
        if self.batch_budget is not None:
            check_positive_int("batch_budget", self.batch_budget)
            if self.sweep == "batch" and not self.points:
                raise SettingError(f"batch_budget={self.batch_budget} holds no batch of n >= 2 "
                                   "trajectories of equal length; allowed: an even number")
        if self.sweep == "stiffness" and "stiffness" not in envs.setting_names(self.env):
            with_stiffness = [name for name in envs.names_without_simulator()
                              if "stiffness" in envs.setting_names(name)]
            raise SettingError(f"sweep='stiffness' needs an env with a stiffness setting "
                               f"({' or '.join(with_stiffness)}), not env={self.env!r}")
        if self.sweep == "stiffness" and not self.stiffnesses:
            raise SettingError("stiffnesses is empty; sweep='stiffness' needs at least one "
                               "(e.g. --stiffnesses 10 100)")

    def _check_policy_checkpoint(self) -> None:
        """policy_checkpoint: a training run on this env, compared with its own network (and
        policy_seed_index one of its seeds)."""
        for name, default in (("policy_seed_index", 0), ("policy_update", None)):
            if self.policy_checkpoint is None and getattr(self, name) != default:
                raise SettingError(f"{name}={getattr(self, name)!r} is read only with "
                                   "policy_checkpoint; give --policy-checkpoint RUN, or leave out "
                                   f"--{name.replace('_', '-')}")
        if self.policy_checkpoint is not None:
            from diffpg.run_files import load_settings

            if not self.policy_checkpoint.strip():  # (Path('') would read as '.')
                raise SettingError(f"policy_checkpoint={self.policy_checkpoint!r} names no "
                                   "folder; allowed: a training run's folder")
            run = load_settings(Path(self.policy_checkpoint), "policy_checkpoint")
            if not (type(self.policy_seed_index) is int
                    and 0 <= self.policy_seed_index < run.seeds):
                raise SettingError(f"policy_seed_index={self.policy_seed_index!r} is not a seed of "
                                   f"policy_checkpoint={self.policy_checkpoint!r}; allowed: "
                                   f"0..{run.seeds - 1}")
            if self.policy_update is not None:
                from diffpg.checkpoints import checkpoint_updates

                kept = checkpoint_updates(Path(self.policy_checkpoint))
                if self.policy_update not in kept:
                    raise SettingError(
                        f"policy_update={self.policy_update!r} is not a checkpoint of "
                        f"policy_checkpoint={self.policy_checkpoint!r} (allowed: {kept}; a "
                        "comparison resumed after its run trained further no longer has its "
                        "policy: start it again)")
            if run.env != self.env:
                raise SettingError(f"policy_checkpoint={self.policy_checkpoint!r} was trained on "
                                   f"env={run.env!r}, not env={self.env!r}; pass --env {run.env}")
            default_sizes = CompareSettings.__dataclass_fields__["hidden_sizes"].default
            if tuple(self.hidden_sizes) not in (default_sizes, tuple(run.hidden_sizes)):
                raise SettingError(
                    f"hidden_sizes={tuple(self.hidden_sizes)} is not the network of "
                    f"policy_checkpoint={self.policy_checkpoint!r} ({tuple(run.hidden_sizes)}), "
                    "which is compared with its own network; drop --hidden-sizes")

    def _check_spec_at_every_point(self, spec: EstimatorSpec) -> None:
        """The settings ``spec`` gives its estimator at every horizon of the sweep."""
        for point in self.points:
            estimators.make_settings(spec.name, **estimator_settings(spec, self, point.horizon))

    def _check_reference_spec(self) -> None:
        """``reference``: auto, exact, or a known estimator's spec with valid settings at every
        point of the sweep (errors name ``reference``)."""
        if self.reference in ("auto", "exact"):
            return
        if parse_spec(self.reference)[0] not in estimators.names():
            raise SettingError(f"reference={self.reference!r} is neither auto, exact nor a "
                               f"known estimator; allowed: auto, exact, "
                               f"{', '.join(estimators.names())}")
        spec = EstimatorSpec.parse(self.reference)
        check_not_owned(dict(spec.overrides), COMPARISON_OWNS,
                        f"reference={self.reference!r}")
        try:
            self._check_spec_at_every_point(spec)
        except SettingError as error:
            raise SettingError(f"reference={self.reference!r}: {error}") from None

    def resolved(self) -> CompareSettings:
        """These settings with the sizes that follow num_estimates filled in (a small
        comparison is small throughout): reference_estimates = 16 x num_estimates, critic_warmup
        = 200 x num_estimates / 64 rounded up, where not given (at most ``LARGEST_INT`` and
        ``MOST_PASSES``)."""
        return dataclasses.replace(
            self,
            reference_estimates=(self.reference_estimates
                                 or min(16 * self.num_estimates, LARGEST_INT)),
            critic_warmup=(self.critic_warmup if self.critic_warmup is not None
                           else min(-(-200 * self.num_estimates // 64), MOST_PASSES)))

    def where(self, point: SweepPoint) -> str:
        """A sweep point as its messages name it: ``sweep=value``, or ``T=horizon`` alone."""
        return f"{self.sweep}={point.value:g}" if self.sweep != "none" else f"T={point.horizon}"

    @property
    def horizons(self) -> tuple[int, ...]:
        if self.sweep != "horizon":
            return (self.horizon,)
        values, h = [], 1
        while h < self.horizon:
            values.append(h)
            h *= 2
        return tuple(values) + (self.horizon,)

    @property
    def points(self) -> tuple[SweepPoint, ...]:
        """The sweep's points: the value swept, the horizon and environment settings at each."""
        if self.sweep == "stiffness":
            return tuple(SweepPoint(s, self.horizon, (("stiffness", s),), self.num_envs)
                         for s in self.stiffnesses)
        if self.sweep == "batch":
            budget = self.batch_budget or self.num_envs * self.horizon
            points, n = [], 2  # leave-one-out baselines need two trajectories
            while n <= budget:
                if budget % n == 0:
                    points.append(SweepPoint(n, budget // n, (), n))
                n *= 2
            return tuple(points)
        return tuple(SweepPoint(h, h, (), self.num_envs) for h in self.horizons)

    @property
    def specs(self) -> tuple[EstimatorSpec, ...]:
        """The estimators compared: those given, or every registered one."""
        return tuple(EstimatorSpec.parse(s) for s in self.estimators or estimators.names())


def estimator_settings(spec: EstimatorSpec, settings: CompareSettings, horizon: int) -> dict:
    """Settings that make the estimator target the comparison's objective ``J_T``, under the
    spec's own overrides."""
    return estimators.comparison_settings(spec.name, horizon, settings.discount,
                                          **dict(spec.overrides))


def check_estimators_fit(settings: CompareSettings, point_envs: list, policy) -> None:
    """Each estimator built at every sweep point (``point_envs``: each point's env), so that a
    setting one point refuses (e.g. more critic minibatches than a short horizon's samples) is
    one line naming the spec and the point before anything compiles; then its state (critics,
    their optimiser's moments, its replay buffer) against the memory available, from its shapes
    at the sweep's last point, before anything is allocated."""
    from diffpg.sampling import check_state_fits

    for spec in settings.specs:
        for point, env in zip(settings.points, point_envs, strict=True):
            try:
                estimator = estimators.make(spec.name, env, policy, **estimator_settings(
                    spec, settings, point.horizon))
            except SettingError as error:
                raise SettingError(f"estimators: {spec.label} at {settings.where(point)}: "
                                   f"{error}") from None
        check_state_fits(estimator, policy, spec.label)


def learners_first(settings: CompareSettings, env, policy) -> tuple[EstimatorSpec, ...]:
    """``settings.specs``, those that learn (a critic, a buffer; as built at the first sweep
    point, on its ``env``) first: they take longest, so two at a time finish sooner."""
    from diffpg.sampling import learns_anything

    def learns(spec: EstimatorSpec) -> bool:
        return learns_anything(estimators.make(spec.name, env, policy, **estimator_settings(
            spec, settings, settings.points[0].horizon)), policy)

    return tuple(sorted(settings.specs, key=lambda spec: not learns(spec)))


def check_reference_learns_nothing(settings: CompareSettings, spec_text: str, env, policy
                                   ) -> None:
    """Refuse a reference estimator with anything to learn (a critic, a replay buffer): the
    reference averages estimates of the fixed policy with no warm-up, so a learned part would
    bias it by whatever it holds at its initial values. Traced only (nothing runs)."""
    from diffpg.sampling import learns_anything

    spec = EstimatorSpec.parse(spec_text)
    estimator = estimators.make(spec.name, env, policy,
                                **estimator_settings(spec, settings, settings.points[0].horizon))
    if learns_anything(estimator, policy):
        raise SettingError(f"reference={spec_text!r} learns a critic or a buffer, which the "
                           "reference does not warm up, so its mean would be biased; allowed: "
                           "auto, exact where the env has one, or an unbiased estimator with "
                           f"nothing to learn (e.g. {estimators.reference_estimator()})")
