"""Checkpoints: weights in safetensors, configuration in JSON, written atomically.

A checkpoint is a directory::

    checkpoint/
      config.json                  {"format", "version", "modules": {name: file}, "config": {...}}
      denoiser.safetensors         one file per module; keys are Module.state_dict() names
      training_state.json          step, optimizer hyperparameters, RNG state, ... (optional)
      training_state.safetensors   the arrays of the training state: Adam moments, EMA shadow, ...

Weights use the `safetensors <https://huggingface.co/docs/safetensors>`_ format
(a JSON header and raw little-endian arrays), read and written with the
package's NumPy API, so diffusers and PyTorch users can open them too. The keys
are our parameter names, which follow diffusers' (``down_blocks.0.resnets.1.conv1.weight``);
the layout is ours (channels-last, conv weights ``(kh, kw, C_in, C_out)``).

The training state is a nested dict of JSON values and arrays. Every array is
moved to ``training_state.safetensors`` under its path in the dict
(``optimizer/state/out.weight/exp_avg``) and the JSON keeps
``{"__array__": "<that path>"}`` in its place; loading puts the arrays back, so
``load_checkpoint(d).training_state`` equals what was saved (tuples come back as lists).

Pickle-based files (``.ckpt``, ``.pt``, ``.pth``, ``.bin``, ``.pkl``) are refused:
unpickling runs whatever code the file names, so opening a downloaded one means
running a stranger's program. safetensors and JSON hold data only.

Left out: sharded weight files, lazy (memory-mapped) loading, keeping several
checkpoints (``keep_last``), and diffusers' own directory layout (a separate importer's job).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as _safetensors_load
from safetensors.numpy import save as _safetensors_save

from diffusion_np.backend import asnumpy
from diffusion_np.nn.module import Module

__all__ = [
    "PICKLE_SUFFIXES",
    "PRETRAINED",
    "PRETRAINED_PREFIX",
    "Checkpoint",
    "CheckpointError",
    "load_checkpoint",
    "pretrained_path",
    "resolve_checkpoint",
    "save_checkpoint",
    "writable_path",
]

FORMAT = "diffusion_np.checkpoint"
VERSION = 1
CONFIG_FILE = "config.json"
STATE_JSON = "training_state.json"
STATE_ARRAYS = "training_state.safetensors"

#: file endings of pickle-based checkpoints (PyTorch, Lightning, pickle itself), refused on load
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")

_PICKLE_REFUSAL = (
    "{path} is a pickle-based file ({suffix}); diffusion_np does not open pickles, because "
    "unpickling executes arbitrary code stored in the file. Convert it to safetensors with the "
    "library that wrote it (e.g. safetensors.torch.save_file) and load that instead"
)
_MODULE_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, of another format, or does not fit the model."""


@dataclass
class Checkpoint:
    """What :func:`load_checkpoint` returns.

    Attributes
    ----------
    directory : Path
        Where it was read from.
    config : dict
        The ``config`` passed to :func:`save_checkpoint` (model configs, task metadata).
    weights : dict
        ``{module name: {parameter name: np.ndarray}}``, as stored (float16 if saved so).
    training_state : dict or None
        The ``training_state`` passed to :func:`save_checkpoint`, arrays restored.
    """

    directory: Path
    config: dict
    weights: dict
    training_state: dict | None

    def load_weights(self, modules: dict[str, Module], strict: bool = True) -> None:
        """Copy the stored weights into ``modules`` (``{name: Module}``), in place.

        Each module's :meth:`~diffusion_np.nn.module.Module.load_state_dict` checks
        names and shapes and lists every missing, unexpected or mis-shaped key.
        """
        absent = [name for name in modules if name not in self.weights]
        if absent:
            raise CheckpointError(
                f"{self.directory} has no weights for {', '.join(absent)}; it holds {', '.join(self.weights)}"
            )
        for name, module in modules.items():
            try:
                module.load_state_dict(self.weights[name], strict=strict)
            except ValueError as err:
                raise CheckpointError(f"{self.directory / (name + '.safetensors')}: {err}") from None


# ----------------------------------------------------------------------------- saving
def save_checkpoint(
    directory,
    modules: dict[str, Module],
    config: dict,
    training_state: dict | None = None,
    dtype=None,
) -> Path:
    """Write ``modules``' weights, ``config`` and the optional ``training_state`` to ``directory``.

    Parameters
    ----------
    directory : str or Path
        The checkpoint directory. If it exists it must be a checkpoint (it is
        replaced) or empty; anything else is refused rather than deleted.
    modules : dict of str -> Module
        One ``<name>.safetensors`` file per entry (names: letters, digits, ``_``, ``-``).
    config : dict
        JSON-serialisable: whatever is needed to rebuild the models (sizes, schedule, task).
    training_state : dict, optional
        Nested dict of JSON values and arrays (step, optimizer/EMA/scheduler state,
        ``rng.bit_generator.state``). Arrays keep their dtype.
    dtype : numpy dtype, optional
        Cast floating-point weights, e.g. ``np.float16`` to halve a file for
        shipping. Refused together with a training state, which must resume exactly.

    Returns
    -------
    Path
        The checkpoint directory.

    Notes
    -----
    The write is atomic: an interruption (crash, Ctrl-C, full disk) at any
    moment leaves either the previous checkpoint or the new one, never a mix.
    How, step by step:

    1. write every file into a fresh temporary directory *beside* the target
       (same filesystem, so the renames below are cheap metadata operations),
       flushing each file with ``fsync`` so its bytes are on disk, not only in
       the page cache;
    2. ``fsync`` the temporary directory, so its list of files is on disk too;
    3. rename the old checkpoint (if any) aside to ``.<name>.old``;
    4. rename the temporary directory to the target name;
    5. ``fsync`` the parent directory, so both renames are durable;
    6. delete ``.<name>.old``.

    Until step 3 the old checkpoint is untouched; an error in steps 1-2 removes
    the temporary directory. POSIX cannot swap two directories in one rename,
    so between steps 3 and 4 (two system calls) the target name is briefly
    absent; a crash exactly then leaves the old checkpoint complete in
    ``.<name>.old`` and the new one in the temporary directory, and
    :func:`load_checkpoint` says so.
    """
    target = Path(directory)
    _check_save_arguments(target, modules, config, training_state, dtype)
    files = _encode_files(modules, config, training_state, dtype)  # everything serialised before touching disk

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private (0700); a checkpoint gets the usual mode
        for name, data in files.items():  # 1. write and flush each file
            _write_bytes(tmp / name, data)
        _fsync_directory(tmp)  # 2. the directory listing
    except BaseException:  # also KeyboardInterrupt: never leave a half-written temporary behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    backup = target.parent / f".{target.name}.old"
    if backup.exists():
        shutil.rmtree(backup)  # a leftover of an earlier interrupted save; the new checkpoint is complete
    if target.exists():
        os.rename(target, backup)  # 3. old checkpoint aside
    os.rename(tmp, target)  # 4. new checkpoint in place
    _fsync_directory(target.parent)  # 5. make the renames durable
    shutil.rmtree(backup, ignore_errors=True)  # 6. the old one is no longer needed
    return target


def _check_save_arguments(target: Path, modules, config, training_state, dtype) -> None:
    if not isinstance(modules, dict) or not modules:
        raise TypeError("modules must be a non-empty dict {name: Module}")
    for name, module in modules.items():
        if not isinstance(name, str) or not _MODULE_NAME.match(name) or name == "training_state":
            raise ValueError(
                f"module name {name!r} must be letters, digits, '_' or '-' (it becomes a file name), "
                "and not 'training_state'"
            )
        if not isinstance(module, Module):
            raise TypeError(f"modules[{name!r}] must be a diffusion_np Module, got {type(module).__name__}")
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict, got {type(config).__name__}")
    if dtype is not None:
        try:
            np.dtype(dtype)
        except TypeError:
            raise TypeError(f"dtype must be a floating dtype such as np.float16, got {dtype!r}") from None
        if not np.issubdtype(np.dtype(dtype), np.floating):
            raise ValueError(f"dtype must be a floating dtype such as np.float16, got {np.dtype(dtype)}")
        if training_state is not None:
            raise ValueError(
                "dtype converts the weights for shipping; a training state needs the exact weights to "
                "resume, so save it without dtype"
            )
    if target.is_file():
        raise CheckpointError(f"{target} is a file, not a checkpoint directory")
    if target.is_dir() and any(target.iterdir()) and not _is_checkpoint(target):
        raise CheckpointError(
            f"refusing to replace {target}: it is not empty and not a diffusion_np checkpoint "
            f"(no {CONFIG_FILE} with format {FORMAT!r}); choose another directory"
        )


def _is_checkpoint(directory: Path) -> bool:
    try:
        return json.loads((directory / CONFIG_FILE).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _encode_files(modules, config, training_state, dtype) -> dict[str, bytes]:
    """{file name: bytes} of the whole checkpoint."""
    files = {}
    for name, module in modules.items():
        tensors = {}
        for key, value in module.state_dict().items():
            value = asnumpy(value)
            if dtype is not None and np.issubdtype(value.dtype, np.floating):
                value = value.astype(dtype)
            tensors[key] = np.ascontiguousarray(value)
        files[f"{name}.safetensors"] = _safetensors_save(tensors, metadata={"format": "np", "module": name})
    if training_state is not None:
        arrays: dict[str, np.ndarray] = {}
        state_json = _split_arrays(training_state, "", arrays)
        files[STATE_ARRAYS] = _safetensors_save(arrays, metadata={"format": "np"})
        files[STATE_JSON] = _to_json(state_json, "training_state")
    header = {
        "format": FORMAT,
        "version": VERSION,
        "modules": {name: f"{name}.safetensors" for name in modules},
        "weights_dtype": None if dtype is None else np.dtype(dtype).name,
        "training_state": training_state is not None,
        "config": config,
    }
    files[CONFIG_FILE] = _to_json(header, "config")
    return files


def _split_arrays(value, path: str, arrays: dict):
    """A JSON-ready copy of ``value`` with every array replaced by ``{"__array__": path}``."""
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"training_state keys must be strings, got {key!r} at '{path}'")
            out[key] = _split_arrays(item, f"{path}/{key}" if path else key, arrays)
        return out
    if isinstance(value, (list, tuple)):
        return [_split_arrays(item, f"{path}/{i}", arrays) for i, item in enumerate(value)]
    if hasattr(value, "shape") and hasattr(value, "dtype") and not isinstance(value, np.generic):
        if path in arrays:
            raise ValueError(f"two training_state entries map to the same array key {path!r}")
        arrays[path] = np.ascontiguousarray(asnumpy(value))
        return {"__array__": path}
    if isinstance(value, np.generic):  # a NumPy scalar: its Python value (JSON has no float32)
        return value.item()
    return value


def _join_arrays(value, arrays: dict):
    """Inverse of :func:`_split_arrays`."""
    if isinstance(value, dict):
        if set(value) == {"__array__"}:
            key = value["__array__"]
            if key not in arrays:
                raise CheckpointError(f"{STATE_ARRAYS} has no array {key!r} named in {STATE_JSON}")
            return arrays[key]
        return {k: _join_arrays(v, arrays) for k, v in value.items()}
    if isinstance(value, list):
        return [_join_arrays(v, arrays) for v in value]
    return value


def _to_json(value, what: str) -> bytes:
    try:
        # allow_nan=False: NaN/Infinity are not JSON; a NaN here is a bug to report, not to store
        return json.dumps(value, indent=2, allow_nan=False).encode()
    except (TypeError, ValueError) as err:
        raise TypeError(f"{what} must be JSON-serialisable (dicts, lists, str, int, finite float): {err}") from None


def _write_bytes(path: Path, data: bytes) -> None:
    """Write and fsync one file (the bytes reach the disk before we rename anything)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _umask() -> int:
    """The process umask (reading it means setting it: set it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_directory(path: Path) -> None:
    """fsync a directory so the names it lists are durable (POSIX; a no-op elsewhere)."""
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- output paths
def writable_path(path, what: str, directory: bool = False) -> Path:
    """``Path(path)`` once it is known that a file (or, with ``directory``, a directory) can be
    written there; otherwise a ValueError naming the argument ``what`` (e.g. ``"-o"``).

    Commands call this before they start the work, so a bad destination costs a second, not
    the minutes of sampling or training before the write. A file's directory must exist; a
    directory is created later, so the nearest existing directory above it is the one tried.
    The test creates (and at once deletes) a temporary file there: permission bits alone do
    not tell, root may write anything they allow, and yet nothing can be created in ``/proc``.
    """
    target = Path(path)
    if directory:
        if target.exists() and not target.is_dir():
            raise ValueError(f"{what} {target} is a file, not a directory")
        where = target
        while not where.exists() and where != where.parent:  # the directory it would be created in
            where = where.parent
        if not where.is_dir():
            raise ValueError(f"{what} {target}: {where} is a file, not a directory")
    else:
        if target.is_dir():
            raise ValueError(f"{what} {target} is a directory; give a file name")
        where = target.parent
        if not where.is_dir():
            raise ValueError(f"{what} {target}: the directory {where} does not exist")
    try:
        with tempfile.TemporaryFile(dir=where):
            pass
    except OSError as err:
        raise ValueError(f"{what} {target} cannot be written: {where} does not accept new files "
                         f"({err.strerror or err})") from None
    return target


# ----------------------------------------------------------------------------- names of checkpoints
# The shipped weights (diffusion_np/pretrained/) are named here, beside the loader that
# resolves their names, so that neither module needs the other at import time;
# diffusion_np.pretrained re-exports these names.

#: what a checkpoint argument starts with to name shipped weights
PRETRAINED_PREFIX = "pretrained:"
#: name -> one line on what it is
PRETRAINED = {
    "digits": "text-conditioned U-Net on 8x8 digits, pixel space",
    "shapes": "latent text-to-image on 32x32 shapes (VAE + U-Net + text encoder)",
    "shapes-controlnet": "a ControlNet for pretrained:shapes: a 32x32 mask places the shape (the base loads with it)",
    "shapes-lora-star": "LoRA for pretrained:shapes that teaches it the word 'star' (--lora, or --checkpoint alone)",
    "shapes-embedding-orange": "textual inversion for pretrained:shapes: the word 'orange' (--embedding)",
    "shapes-lcm": "pretrained:shapes distilled by latent consistency distillation: 1-8 steps with --sampler lcm",
    "digits-lcm": "pretrained:digits distilled by latent consistency distillation: 1-8 steps with --sampler lcm",
}
_PRETRAINED_ROOT = Path(__file__).resolve().parent.parent / "pretrained"


def pretrained_path(name: str) -> Path:
    """The directory of shipped model ``name`` (a key of :data:`PRETRAINED`)."""
    if not isinstance(name, str):
        raise TypeError(f"pretrained model name must be a str, got {type(name).__name__}")
    if name not in PRETRAINED:
        raise CheckpointError(f"no pretrained model {name!r}; the shipped ones are "
                              + ", ".join(PRETRAINED_PREFIX + n for n in PRETRAINED))
    path = _PRETRAINED_ROOT / name
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{PRETRAINED_PREFIX}{name}: the weights are missing from {path} (this copy of "
                              "diffusion_np was installed without its package data; reinstall it from the repository)")
    return path


def resolve_checkpoint(spec) -> Path:
    """The checkpoint directory that ``spec`` names.

    ``"pretrained:NAME"`` -> the shipped weights; a run directory of ``diffusion-np train``
    (one holding ``checkpoint/``) -> its latest checkpoint; anything else -> ``Path(spec)``
    unchanged (:func:`load_checkpoint` says what is wrong with it, if anything).
    """
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"checkpoint directory must be a str or path, got {type(spec).__name__}")
    text = str(spec)
    if text.startswith(PRETRAINED_PREFIX):
        return pretrained_path(text[len(PRETRAINED_PREFIX):])
    path = Path(spec)
    if (path / "checkpoint").is_dir() and not (path / "config.json").exists():
        return path / "checkpoint"
    return path


# ----------------------------------------------------------------------------- loading
def load_checkpoint(directory) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint`.

    ``directory`` may also be a run directory of ``diffusion-np train`` (its
    ``checkpoint/`` is read) or ``"pretrained:NAME"``, the weights shipped with the
    package (:mod:`diffusion_np.pretrained`).

    Raises :class:`CheckpointError` with the reason for a missing or incomplete
    directory, a file of another format, or a pickle-based file (refused, see the
    module docstring). Weights come back as NumPy arrays; put them into modules
    with :meth:`Checkpoint.load_weights`.
    """
    path = resolve_checkpoint(directory)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise CheckpointError(_PICKLE_REFUSAL.format(path=path, suffix=path.suffix))
    if not path.exists():
        backup = path.parent / f".{path.name}.old"
        hint = (
            f"; an interrupted save left the previous checkpoint in {backup}: rename it to {path.name}"
            if backup.is_dir()
            else ""
        )
        raise CheckpointError(f"no checkpoint at {path}: the directory does not exist{hint}")
    if path.is_file():
        raise CheckpointError(
            f"{path} is a file; a diffusion_np checkpoint is a directory with {CONFIG_FILE} and .safetensors files"
        )
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        pickles = sorted(p.name for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
        if pickles:
            raise CheckpointError(_PICKLE_REFUSAL.format(path=path / pickles[0], suffix=Path(pickles[0]).suffix))
        raise CheckpointError(f"{path} is not a diffusion_np checkpoint: {CONFIG_FILE} is missing")
    try:
        header = json.loads(config_path.read_text())
    except ValueError as err:
        raise CheckpointError(f"{config_path} is not valid JSON: {err}") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise CheckpointError(f"{config_path} is not a diffusion_np checkpoint (format {FORMAT!r} expected)")
    if header.get("version") != VERSION:
        raise CheckpointError(f"{config_path} has format version {header.get('version')}; this library reads {VERSION}")

    modules = header.get("modules")
    if not isinstance(modules, dict) or not all(
        isinstance(name, str) and isinstance(file, str) and "/" not in file and "\\" not in file
        for name, file in modules.items()
    ):
        raise CheckpointError(f'{config_path}: "modules" must map module names to .safetensors file names, '
                              f"got {modules!r}")
    if not isinstance(header.get("config"), dict):
        raise CheckpointError(f'{config_path}: "config" must be a JSON object, got {header.get("config")!r}')
    weights = {name: _read_safetensors(path / file) for name, file in modules.items()}
    training_state = None
    if header.get("training_state"):
        try:
            state_json = json.loads((path / STATE_JSON).read_text())
        except FileNotFoundError:
            raise CheckpointError(f"{path / STATE_JSON} is missing") from None
        except ValueError as err:
            raise CheckpointError(f"{path / STATE_JSON} is not valid JSON: {err}") from None
        training_state = _join_arrays(state_json, _read_safetensors(path / STATE_ARRAYS))
    return Checkpoint(path, header["config"], weights, training_state)


def _read_safetensors(path: Path) -> dict:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing (the checkpoint is incomplete)") from None
    try:
        return _safetensors_load(data)
    except (SafetensorError, ValueError) as err:
        raise CheckpointError(f"{path} is not a valid safetensors file: {err}") from None
