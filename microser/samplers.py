"""The study's sampler: Optuna's samplers, each trial seeded by its number so workers on many hosts draw apart."""

from __future__ import annotations

import warnings
from typing import Callable

import numpy as np
import optuna


def make_sampler(config) -> optuna.samplers.BaseSampler:
    """The study's sampler, seeded per trial number (see `TrialSeededSampler`); the same for every worker."""

    def make(seed: int) -> optuna.samplers.BaseSampler:
        if config.sampler in ("tpe", "tpe-group"):
            return optuna.samplers.TPESampler(multivariate=True, group=config.sampler == "tpe-group", seed=seed,
                                              n_startup_trials=10)   # Optuna >= 4.9 no longer warns here
        if config.sampler == "nsga2":
            return optuna.samplers.NSGAIISampler(seed=seed, population_size=16)
        if config.sampler == "gp":   # conditional parameters (per-block widths, family bodies) are drawn at random
            return optuna.samplers.GPSampler(seed=seed, n_startup_trials=10, warn_independent_sampling=False)
        return optuna.samplers.RandomSampler(seed=seed)

    return TrialSeededSampler(make, config.seed)


class TrialSeededSampler(optuna.samplers.BaseSampler):
    """Trial ``n`` draws with a sampler seeded by ``(seed, n)`` only.

    Workers started with the same command on many hosts would otherwise draw
    the same candidates (same seed, same sequence); trial numbers are unique
    in the storage, so here every trial draws differently, and a one-worker
    run repeats exactly. The inner sampler reads the study's history from
    the storage, so making a fresh one per trial loses nothing.
    """

    def __init__(self, make: Callable[[int], optuna.samplers.BaseSampler], seed: int):
        self._make, self._seed = make, int(seed)
        self.explore = False   # set by the search after a duplicate draw: the next trial draws at random
        self._inner = self._fresh(0)

    def _fresh(self, number: int) -> optuna.samplers.BaseSampler:
        seed = int(np.random.SeedSequence([self._seed, int(number)]).generate_state(1)[0])
        if self.explore:   # a model-based sampler that proposed a trained candidate again would again
            return optuna.samplers.RandomSampler(seed=seed)
        with warnings.catch_warnings():   # multivariate TPE is marked experimental
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return self._make(seed)

    def before_trial(self, study, trial) -> None:
        self._inner = self._fresh(trial.number)
        self._inner.before_trial(study, trial)

    def infer_relative_search_space(self, study, trial):
        return self._inner.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self._inner.sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._inner.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study, trial, state, values) -> None:
        self._inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        """Nothing to do: every trial's seed is fixed by its number."""
