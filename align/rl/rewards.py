"""The reward of an online run: one registry reward, or a weighted ``rewards.CombinedReward`` (logs each part).

Every reward an online run calls is checked where it is called, whatever the objective: a reward that returns
something other than one number (or None) per image is one ``UserError`` line naming it, and a training reward
that gives the run nothing to learn from (every image None / NaN, or every image the same score) for
``NO_SIGNAL_LIMIT`` scorings in a row stops the run with one line naming it: advantages would be 0, so would the
gradient, and the "trained" model would equal the start."""

from __future__ import annotations

import importlib
import logging
import math
import numbers
from typing import Any, Callable

from qwen_image.errors import UserError, on_processes, stop_everywhere

logger = logging.getLogger(__name__)

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


def _gather(payload: Any) -> list[Any]:
    """``payload`` of every process, in rank order (``[payload]`` in a single-process run)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [payload]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, payload)
    return gathered


class SignalWatch:
    """A ``rewards.CombinedReward`` that stops the run after ``limit`` scorings in a row with no signal: every
    total None (on any one process: its reward is broken there), or every total the same value (zero spread over
    those scorings of all processes together, so a batch of one image is judged over several).

    The verdict is the same on every process: each scoring exchanges every process's totals (and any error its
    reward checks raised) with all the others (``torch.distributed.all_gather_object``, once per rollout batch), so
    a reward that fails on one process only stops every process at the same scoring, with one line, instead of
    leaving the others waiting for it in their next collective.

    ``stop_on_zero_spread=False`` (the combined objective while another term trains): zero spread then means a
    reward saturated on these prompts (every rollout already scores the same, e.g. OCR 1.0 on text the model
    already writes) as much as a broken one, and the run still learns from its other terms; it logs one warning
    per streak instead of stopping. None / NaN for every image still stops: that reward is broken."""

    def __init__(self, reward: Any, limit: int = NO_SIGNAL_LIMIT, stop_on_zero_spread: bool = True):
        self.reward = reward
        self.limit = limit
        self.stop_on_zero_spread = stop_on_zero_spread
        self.warned = False  # zero spread already reported for the current streak
        self.recent: list[list[list[float | None]]] = []  # per scoring: every process's totals, in rank order

    def __getattr__(self, name: str) -> Any:  # names, weights, reward_name of the combination
        if name == "reward":  # not set yet (copy / unpickle build the object without __init__)
            raise AttributeError(name)
        return getattr(self.reward, name)

    def compute(self, prompts, images, **columns):
        result, error = None, None
        try:
            result = self.reward.compute(prompts, images, **columns)
        except UserError as err:  # the reward's output failed its checks here: every process must hear of it
            error = str(err)
        totals = None if result is None else list(result.total)
        silent = [] if result is None else [k for k, v in result.per_reward.items() if all(x is None for x in v)]
        everyone = _gather({"totals": totals, "silent": silent, "error": error})
        failed = [(rank, p["error"]) for rank, p in enumerate(everyone) if p["error"] is not None]
        if failed:
            rank, message = failed[0]
            raise stop_everywhere(message + on_processes(rank, len(failed), len(everyone)))
        self._watch([p["totals"] for p in everyone], [p["silent"] for p in everyone])
        return result

    def __call__(self, prompts, images, **columns):
        return self.compute(prompts, images, **columns).total

    def _describe(self) -> str:
        names = list(getattr(self.reward, "names", []))
        return repr(names[0]) if len(names) == 1 else f"combination {names}"

    def _watch(self, totals: list[list[float | None]], silent: list[list[str]]) -> None:
        """``totals``/``silent``: every process's totals of this scoring and the rewards that were None for all of
        its images (in rank order; the same on every process, so every process decides the same)."""
        if self.limit <= 0:
            return
        self.recent = [*self.recent, totals][-self.limit:]
        if len(self.recent) < self.limit:
            return
        world = len(totals)
        scored = [[v for batch in self.recent for v in batch[rank]] for rank in range(world)]
        empty = [rank for rank in range(world) if scored[rank] and all(v is None for v in scored[rank])]
        if empty:
            rank = empty[0]
            n = len(scored[rank])
            names = silent[rank]
            raise stop_everywhere(
                f"reward {self._describe()} scored every image None / NaN for {self.limit} rollout batches in a row "
                f"({n} images{'; ' + ', '.join(names) + ' always None' if names else ''}"
                f"{on_processes(rank, len(empty), world, inside=True)}): the run has nothing to learn from; check the "
                f"reward and the prompts it needs (e.g. quoted text for ocr)")
        values = [v for batch in self.recent for per_rank in batch for v in per_rank if v is not None]
        n = sum(len(per_rank) for batch in self.recent for per_rank in batch)
        if not (len(values) > 1 and max(values) == min(values)):
            self.warned = False
            return
        what = (f"reward {self._describe()} gave every image the same score ({values[0]:g}) for {self.limit} rollout "
                f"batches in a row ({n} images{' over ' + str(world) + ' processes' if world > 1 else ''})")
        if self.stop_on_zero_spread:
            raise stop_everywhere(f"{what}: zero spread means zero advantages and no learning; check the reward")
        if not self.warned:
            self.warned = True
            import torch.distributed as dist

            if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
                logger.warning(f"{what}: the online term has nothing to learn from these rollouts (a saturated or "
                               f"broken reward); the other terms go on training")


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
                 watch_signal: bool = True, stop_on_zero_spread: bool = True):
    """The configured reward (``args.reward_funcs`` / ``reward_weights`` / ``reward_kwargs``). ``funcs``/``weights``
    name another set (the held-out monitor's); ``reward_kwargs`` apply to both. Every part is checked
    (:func:`checked`); with ``watch_signal`` the whole is a :class:`SignalWatch` (training rewards, not monitors);
    ``stop_on_zero_spread=False`` where other terms train beside the online one (see :class:`SignalWatch`)."""
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
    return SignalWatch(reward, int(getattr(args, "reward_no_signal_limit", NO_SIGNAL_LIMIT)), stop_on_zero_spread)
