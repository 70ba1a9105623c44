"""Everything needed to continue a class's training exactly where it stopped (--resume).

OUTPUT_DIR/CLASS/train_state.pdparams holds the epoch, the weights of the parts the model
trains (its trainable_parts(), under their keys), each optimizer group's moments (under the
group's name), the batch sampler's RNG state, Python's and NumPy's RNG states,
the loss history and the settings that shaped the run (its fingerprint). It is written
atomically every --save_interval epochs and at the last epoch; a resumed run then takes
the same batches in the same order with the same optimizer state, so it ends with the
same weights as an unbroken run (tests/test_resume.py kills a run and checks this).

OUTPUT_DIR/CLASS/status.json marks a finished class (its fingerprint and metrics), so a
second run over all classes skips it unless --force.

A state without a model name (written before model/registry.py) is RD4AD's: parts
"bottleneck" and "student", one optimizer ("optimizer", "param_names" a list).
"""
from __future__ import annotations

import json
import os
import random
from typing import Any

import numpy as np
import paddle

from utils.config import ConfigError
from utils.errors import UserError, shorten
from utils.io import atomic_write, atomic_write_json
from model.base import AnomalyModel
from model.registry import DEFAULT_MODEL, model_class
from utils.numbers import MAX_EPOCHS
from utils.safe_pickle import load_plain_pickle

from .checkpoint import LEGACY_PARTS, CheckpointError, part_layers
from .config import Config, model_options

STATE_FORMAT = "rd4ad-paddle-train-state/1"
# Settings that change the trained weights; paths are left out so data can move.
FINGERPRINT_KEYS = ("arch", "image_size", "epochs", "batch_size", "lr", "beta1", "beta2", "seed",
                    "teacher_weights", "val_ratio", "feature_cache", "feature_cache_dtype", "amp")


def fingerprint(cfg: Config, cls: str) -> dict[str, Any]:
    """The settings that shape class `cls`'s weights: its epochs, the model and its options."""
    d = cfg.to_dict()
    out = {k: d[k] for k in FINGERPRINT_KEYS}
    out["epochs"] = cfg.epochs_for(cls)
    if not cfg.feature_cache:
        out.pop("feature_cache_dtype")
    if cfg.model != DEFAULT_MODEL or model_options(cfg):  # RD4AD's stays as before: old states resume
        out.update(model=cfg.model, **model_options(cfg))
    return out


def _with_model(saved: dict) -> dict:
    """A fingerprint saved before model/registry.py is RD4AD's."""
    return saved if "model" in saved else {**saved, "model": DEFAULT_MODEL}


def state_path(cfg: Config, cls: str) -> str:
    return cfg.paths.train_state(cls)


def status_path(cfg: Config, cls: str) -> str:
    return cfg.paths.status(cls)


def _differences(saved: dict, current: dict) -> str:
    keys = sorted(set(saved) | set(current))
    return ", ".join(f"{k}={saved.get(k)!r} (now {current.get(k)!r})"
                     for k in keys if saved.get(k) != current.get(k))


def finished_metrics(cfg: Config, cls: str) -> dict | None:
    """The metrics of a finished class with the same settings; None when not finished.
    A class finished with other settings is an error unless --force (it would be mixed
    into the results table otherwise)."""
    path = status_path(cfg, cls)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            status = json.load(f)
        saved, metrics = status["fingerprint"], status["metrics"]
    except (OSError, ValueError, KeyError, TypeError):
        return None  # unreadable marker: train again
    if not os.path.isfile(cfg.paths.checkpoint(cls)):
        return None
    diff = _differences(_with_model(saved), _with_model(fingerprint(cfg, cls)))
    if diff:
        raise ConfigError(f"{path}: class {cls!r} already finished with other settings ({diff}); "
                          f"use --force to retrain it, or another --output_dir")
    return metrics


def mark_finished(cfg: Config, cls: str, metrics: dict) -> None:
    atomic_write_json(status_path(cfg, cls), {"finished": True, "fingerprint": fingerprint(cfg, cls),
                                              "metrics": metrics})
    path = state_path(cfg, cls)
    if os.path.exists(path):
        os.remove(path)  # the final checkpoint replaces it; it holds the optimizer too (large)


def save_train_state(cfg: Config, cls: str, *, epoch: int, net: AnomalyModel,
                     optimizers: dict[str, paddle.optimizer.Optimizer], sampler_rng: np.random.Generator,
                     loss_history: list, extra: dict | None = None) -> None:
    """`optimizers`: one per optimizer group of `net`, by the group's name."""
    parts = part_layers(net)
    groups = {g.name: g.parameters for g in net.optimizer_groups(cfg.lr)}
    state = {
        "format": STATE_FORMAT,
        "fingerprint": json.dumps(fingerprint(cfg, cls), sort_keys=True),
        "epoch": int(epoch),
        "model": net.name,
        "parts": list(parts),
        **{key: layer.state_dict() for key, layer in parts.items()},
        "optimizers": {name: opt.state_dict() for name, opt in optimizers.items()},
        "param_names": {name: [p.name for p in groups[name]] for name in optimizers},
        "sampler_rng": json.dumps(sampler_rng.bit_generator.state),
        "python_rng": json.dumps(random.getstate()),
        "numpy_rng": json.dumps(_numpy_state_to_json(np.random.get_state())),
        "loss_history": json.dumps(loss_history),
        "extra": json.dumps(extra or {}),
    }
    atomic_write(state_path(cfg, cls), lambda tmp: paddle.save(state, tmp))


def load_train_state(cfg: Config, cls: str) -> dict | None:
    """The saved state, checked against the current settings; None when there is none."""
    path = state_path(cfg, cls)
    if not os.path.isfile(path):
        return None
    try:
        state = load_plain_pickle(path, "training state")
    except UserError as err:
        raise CheckpointError(f"{err}; delete it to start the class again") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{path}: not an RD4AD-Paddle training state; delete it to start "
                              f"the class again")
    state = _checked_state(state, path)
    diff = _differences(_with_model(state["fingerprint"]), _with_model(fingerprint(cfg, cls)))
    if diff:
        raise ConfigError(f"{path}: saved with other settings ({diff}); resume with the same "
                          f"settings, or drop --resume to start again")
    # a fresh model of these settings (no teacher weights: only names and shapes matter)
    check_fits_model(state, model_class(cfg.model)(cfg.arch, cfg.image_size, **model_options(cfg)),
                     cfg.lr, path)
    return state


_ACCUMULATORS = ("_moment1_0", "_moment2_0", "_beta1_pow_acc_0", "_beta2_pow_acc_0")


def check_fits_model(state: dict, net: AnomalyModel, lr: float, path: str) -> None:
    """Every weight and optimizer moment has the name, shape and dtype a fresh model of
    these settings gives it: a state that would fail (or silently broadcast) half-way
    through restoring is one line before anything runs."""
    def damaged(what: str) -> CheckpointError:
        return CheckpointError(f"{path}: damaged training state ({what}); delete it to start the class again")

    parts = part_layers(net)
    if set(state["parts"]) != set(parts):
        raise damaged(f"parts {shorten(state['parts'])}, the {net.name} model trains {', '.join(parts)}")
    for part, layer in parts.items():
        own, given = layer.state_dict(), state[part]
        if set(own) != set(given):
            raise damaged(f"{part} weights do not fit the {net.build_args()['arch']} model")
        for name, value in own.items():
            if list(given[name].shape) != list(value.shape) or given[name].dtype != np.float32:
                raise damaged(f"{part} weight {shorten(name)}: {given[name].dtype} {list(given[name].shape)}, "
                              f"expected float32 {list(value.shape)}")
    groups, optimizers, names = _saved_groups(state, net, lr)
    if set(optimizers) != set(groups):
        raise damaged(f"optimizer groups {shorten(sorted(optimizers))}, the {net.name} model has "
                      f"{', '.join(groups)}")
    for group, params in groups.items():
        _check_optimizer(optimizers[group], names.get(group), params, damaged)


def _check_optimizer(optimizer: dict, names, params: list, damaged) -> None:
    if not isinstance(names, list) or len(names) != len(params):
        raise damaged(f"{len(names) if isinstance(names, list) else 'no'} parameter names for "
                      f"{len(params)} parameters")
    shapes = {old: list(p.shape) for old, p in zip(names, params)}
    by_length = sorted(names, key=len, reverse=True)
    for key, value in optimizer.items():
        if isinstance(value, dict):
            continue  # LR_Scheduler / master_weights: not used by this project's Adam
        owner = next((n for n in by_length if key.startswith(n + "_")), None)
        suffix = key[len(owner):] if owner else ""
        if owner is None or suffix not in _ACCUMULATORS:
            raise damaged(f"optimizer entry {shorten(key)}")
        expected = shapes[owner] if "moment" in suffix else [1]
        if list(value.shape) != expected or value.dtype != np.float32 or not np.isfinite(value).all():
            raise damaged(f"optimizer entry {shorten(key)}: {value.dtype} {list(value.shape)}, expected "
                          f"finite float32 {expected}")


_JSON_PARTS = ("fingerprint", "sampler_rng", "python_rng", "numpy_rng", "loss_history", "extra")


def _checked_state(state: dict, path: str) -> dict:
    """Every part of a training state with its type, JSON parts decoded: a damaged file is
    one line here, not a traceback halfway through restoring it."""
    def damaged(part: str) -> CheckpointError:
        return CheckpointError(f"{path}: damaged training state ({part} {shorten(state.get(part, 'missing'))}); "
                               f"delete it to start the class again")

    out = dict(state)
    if "model" not in state:  # RD4AD's, written before model/registry.py
        if "optimizer" not in state:
            raise damaged("optimizer")
        out.update(model=DEFAULT_MODEL, parts=list(LEGACY_PARTS), optimizers={"": state["optimizer"]},
                   param_names={"": state.get("param_names")})
        out.pop("optimizer")
    if not isinstance(out["model"], str) or not isinstance(out.get("parts"), list) or not all(
            isinstance(p, str) for p in out["parts"]):
        raise damaged("parts")
    if not isinstance(out.get("optimizers"), dict) or not isinstance(out.get("param_names"), dict):
        raise damaged("optimizers")
    for part in _JSON_PARTS:
        try:
            out[part] = json.loads(state[part])
        except (KeyError, TypeError, ValueError, RecursionError):
            raise damaged(part) from None
    if not isinstance(out["fingerprint"], dict) or not isinstance(out["extra"], dict):
        raise damaged("fingerprint/extra")
    if not isinstance(out["loss_history"], list):
        raise damaged("loss_history")
    if not isinstance(state.get("epoch"), int) or isinstance(state["epoch"], bool) or not 0 <= state["epoch"] <= MAX_EPOCHS:
        raise damaged("epoch")
    for part in out["parts"]:
        values = state.get(part)
        if not isinstance(values, dict) or not all(
                isinstance(k, str) and isinstance(v, np.ndarray) for k, v in values.items()):
            raise damaged(part)
        if not all(np.isfinite(v).all() for v in values.values()):
            raise CheckpointError(f"{path}: {part} weights are not finite (NaN or inf); delete it "
                                  f"to start the class again")
    for group, values in out["optimizers"].items():
        if not isinstance(group, str) or not isinstance(values, dict) or not all(
                isinstance(k, str) and (isinstance(v, np.ndarray) or _flat_dict(v))  # LR_Scheduler
                for k, v in values.items()):
            raise damaged("optimizer")
    for group, names in out["param_names"].items():
        if not isinstance(group, str) or not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise damaged("param_names")
    return out


def _flat_dict(value: Any) -> bool:
    """An optimizer's LR_Scheduler state: names (str keys) to plain values."""
    return isinstance(value, dict) and len(value) <= 64 and all(
        isinstance(k, str) and isinstance(v, (str, int, float, bool, type(None))) for k, v in value.items())


def restore_train_state(state: dict, net: AnomalyModel, optimizers: dict[str, paddle.optimizer.Optimizer],
                        lr: float, sampler_rng: np.random.Generator) -> tuple[int, list, dict]:
    """Load weights, each group's optimizer moments and RNG states; return (epoch,
    loss_history, extra). `state` is load_train_state's (checked, JSON parts decoded);
    `lr` the --lr the optimizer groups were made with."""
    for part, layer in part_layers(net).items():
        own = layer.state_dict()
        given = state.get(part, {})
        if set(own) != set(given) or any(list(own[k].shape) != list(given[k].shape) for k in own):
            raise CheckpointError(f"training state: {part} weights do not fit this model; delete it "
                                  f"to start the class again")
        layer.set_state_dict(given)
    groups, saved, names = _saved_groups(state, net, lr)
    if set(saved) != set(optimizers):
        raise CheckpointError(f"training state: optimizer groups {', '.join(saved)}, this model has "
                              f"{', '.join(optimizers)}; delete it to start the class again")
    for group, optimizer in optimizers.items():
        optimizer.set_state_dict(_rename_optimizer_state(saved[group], names[group],
                                                         [p.name for p in groups[group]]))
    try:
        sampler_rng.bit_generator.state = state["sampler_rng"]
        version, internal, gauss = state["python_rng"]
        random.setstate((version, tuple(internal), gauss))
        name, keys, pos, has_gauss, cached = state["numpy_rng"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    except (TypeError, ValueError, KeyError, OverflowError) as err:
        raise CheckpointError(f"training state: damaged random-generator state ({type(err).__name__}); "
                              f"delete it to start the class again") from None
    return state["epoch"], state["loss_history"], state["extra"]


def _saved_groups(state: dict, net: AnomalyModel, lr: float) -> tuple[dict, dict, dict]:
    """(the model's optimizer groups' parameters, the state's optimizer states, the state's
    parameter names), each keyed by group name."""
    groups = {g.name: g.parameters for g in net.optimizer_groups(lr)}
    return (groups, _legacy_group(state["optimizers"], groups),
            _legacy_group(state["param_names"], groups))


def _legacy_group(by_group: dict, groups: dict) -> dict:
    """A state from before model/registry.py keeps its one optimizer under "": it is the
    model's only group."""
    if set(by_group) == {""} and len(groups) == 1:
        return {next(iter(groups)): by_group[""]}
    return by_group


def _numpy_state_to_json(state: tuple) -> list:
    name, keys, pos, has_gauss, cached = state
    return [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]


def _rename_optimizer_state(opt_state: dict, old_names: list[str], new_names: list[str]) -> dict:
    """Optimizer accumulators are keyed '<parameter name>_<moment>_0', and parameter names
    come from a global counter: map them by position so a state from another process (or
    a second model in this one) lands on the right parameters."""
    if len(old_names) != len(new_names):
        raise CheckpointError("training state: parameter count differs from this model")
    rename = dict(zip(old_names, new_names))
    by_length = sorted(old_names, key=len, reverse=True)
    out = {}
    for key, value in opt_state.items():
        for old in by_length:
            if key.startswith(old + "_"):
                key = rename[old] + key[len(old):]
                break
        out[key] = value
    return out
