"""The reward of an online run: one registry reward, or a weighted ``rewards.CombinedReward`` (logs each part).

Every reward an online run calls is checked where it is called, whatever the objective: a reward that returns
something other than one number (or None) per image is one ``UserError`` line naming it, and a training reward
that gives the run nothing to learn from (every image None / NaN, or every image the same score) for
``NO_SIGNAL_LIMIT`` scorings in a row stops the run with one line naming it: advantages would be 0, so would the
gradient, and the "trained" model would equal the start."""

from __future__ import annotations

import importlib
import math
import numbers
from typing import Any, Callable

from qwen_image.errors import UserError

# Scorings (rollout batches) in a row without any signal before an online run stops; a run sets its own with
# ``--reward_no_signal_limit`` (0 switches the check off).
NO_SIGNAL_LIMIT = 3


def check_reward_values(name: str, values: Any, n: int) -> list[float | None]:
    """``values`` as one float-or-None per image (NaN -> None), or a UserError naming the reward ``name``."""
    if hasattr(values, "tolist") and not isinstance(values, (list, tuple)):  # a tensor / ndarray
        values = values.tolist()
    if isinstance(values, (str, bytes, dict)) or not isinstance(values, (list, tuple)):
        raise UserError(f"reward {name!r} returned a {type(values).__name__}, not a list of {n} scores: a reward "
                        f"returns one float (or None) per image")
    if len(values) != n:
        raise UserError(f"reward {name!r} returned {len(values)} values for {n} images: a reward returns one float "
                        f"(or None) per image, in the order of the images")
    clean: list[float | None] = []
    for i, v in enumerate(values):
        if v is None:
            clean.append(None)
            continue
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise UserError(f"reward {name!r} returned {v!r} ({type(v).__name__}) for image {i}: scores must be "
                            f"numbers (or None where the reward does not apply)")
        v = float(v)
        if math.isinf(v):
            raise UserError(f"reward {name!r} returned {v} for image {i}: scores must be finite (None where the "
                            f"reward does not apply)")
        clean.append(None if math.isnan(v) else v)
    return clean


def checked(name: str, fn: Callable) -> Callable:
    """``fn`` whose every output goes through :func:`check_reward_values` (attributes such as ``reward_name`` are
    kept readable through the wrapper)."""

    def call(prompts, images, **columns):
        return check_reward_values(name, fn(prompts, images, **columns), len(prompts))

    call.reward_name = name  # type: ignore[attr-defined]
    call.__wrapped__ = fn  # type: ignore[attr-defined]
    return call


class SignalWatch:
    """A ``rewards.CombinedReward`` that stops the run after ``limit`` scorings in a row with no signal: every
    total None, or every total the same value (zero spread over those scorings together, so a batch of one image
    is judged over several)."""

    def __init__(self, reward: Any, limit: int = NO_SIGNAL_LIMIT):
        self.reward = reward
        self.limit = limit
        self.recent: list[list[float | None]] = []

    def __getattr__(self, name: str) -> Any:  # names, weights, reward_name of the combination
        if name == "reward":  # not set yet (copy / unpickle build the object without __init__)
            raise AttributeError(name)
        return getattr(self.reward, name)

    def compute(self, prompts, images, **columns):
        result = self.reward.compute(prompts, images, **columns)
        self._watch(list(result.total), result.per_reward)
        return result

    def __call__(self, prompts, images, **columns):
        return self.compute(prompts, images, **columns).total

    def _describe(self) -> str:
        names = list(getattr(self.reward, "names", []))
        return repr(names[0]) if len(names) == 1 else f"combination {names}"

    def _watch(self, totals: list[float | None], per: dict[str, list]) -> None:
        if self.limit <= 0:
            return
        self.recent = [*self.recent, totals][-self.limit:]
        if len(self.recent) < self.limit:
            return
        values = [v for batch in self.recent for v in batch if v is not None]
        n = sum(len(batch) for batch in self.recent)
        if not values:
            silent = [k for k, v in per.items() if all(x is None for x in v)]
            raise UserError(f"reward {self._describe()} scored every image None / NaN for {self.limit} rollout batches "
                            f"in a row ({n} images{'; ' + ', '.join(silent) + ' always None' if silent else ''}): "
                            f"the run has nothing to learn from; check the reward and the prompts it needs (e.g. "
                            f"quoted text for ocr)")
        if len(values) > 1 and max(values) == min(values):
            raise UserError(f"reward {self._describe()} gave every image the same score ({values[0]:g}) for "
                            f"{self.limit} rollout batches in a row ({n} images): zero spread means zero advantages "
                            f"and no learning; check the reward")
        return


def _import_reward_modules(funcs: list[str]) -> None:
    """Import the modules of dotted reward names (``my_pkg.rewards.fn``) so that one raising on import is one
    line naming it (the registry turns only ImportError into its own message)."""
    from rewards import available_rewards

    known = set(available_rewards())
    for name in funcs:
        if not isinstance(name, str) or name in known or "." not in name:
            continue
        module = name.rpartition(".")[0]
        try:
            importlib.import_module(module)
        except ImportError:
            continue  # the registry says which module is missing
        except Exception as err:  # the user's module is broken: say where, without our stack
            tb = err.__traceback__
            where = ""
            while tb is not None:
                if tb.tb_frame.f_code.co_filename.endswith(".py") and "importlib" not in tb.tb_frame.f_code.co_filename:
                    where = f" at {tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}"
                tb = tb.tb_next
            raise UserError(f"reward {name!r}: importing {module!r} raised {type(err).__name__}: {err}{where}") from None


def build_reward(args: Any, funcs: list[str] | None = None, weights: list[float] | None = None,
                 watch_signal: bool = True):
    """The configured reward (``args.reward_funcs`` / ``reward_weights`` / ``reward_kwargs``). ``funcs``/``weights``
    name another set (the held-out monitor's); ``reward_kwargs`` apply to both. Every part is checked
    (:func:`checked`); with ``watch_signal`` the whole is a :class:`SignalWatch` (training rewards, not monitors)."""
    from rewards import combine

    funcs = list(args.reward_funcs if funcs is None else funcs)
    weights = args.reward_weights if funcs == list(args.reward_funcs) and weights is None else weights
    if not funcs:
        raise UserError("reward_funcs is empty: name at least one reward (see rewards.available_rewards()).")
    kwargs = args.reward_kwargs or {}
    unknown = set(kwargs) - set(args.reward_funcs) - set(args.monitor_reward_funcs or [])
    if unknown:
        raise UserError(f"reward_kwargs for rewards not in reward_funcs: {sorted(unknown)}")
    _import_reward_modules(funcs)
    try:
        reward = combine(funcs, weights, reward_kwargs={k: v for k, v in kwargs.items() if k in funcs})
    except KeyError as err:  # UnknownNameError: its message is the first argument (str() of a KeyError quotes it)
        raise UserError(str(err.args[0]) if err.args else str(err)) from None
    except TypeError as err:  # a reward class whose constructor rejects the reward_kwargs
        raise UserError(f"reward_funcs {funcs}: {err}") from None
    reward.fns = [checked(name, fn) for name, fn in zip(reward.names, reward.fns)]
    if not watch_signal:
        return reward
    return SignalWatch(reward, int(getattr(args, "reward_no_signal_limit", NO_SIGNAL_LIMIT)))
