"""Allow-listed unpickling: a pickle may name only exact ``(module, qualname)`` pairs.

Why exact pairs
---------------
``pickle.Unpickler.find_class(module, name)`` imports ``module`` and, from protocol 4
on, resolves a dotted ``name`` attribute by attribute.  Allowing a *module* therefore
allows everything reachable from its namespace: ``torch.distributed.checkpoint.filesystem``
imports ``os``, so the global ``("torch.distributed.checkpoint.filesystem", "os.system")``
is ``os.system``; ``"torch.storage._load_from_bytes"`` under the same module is a full
``torch.load(weights_only=False)``.  Allowing a *class* by prefix is no better
(``"Path.touch"`` is a method).  So :class:`RestrictedUnpickler`:

* accepts a global only if ``(module, qualname)`` is one of the allowed pairs, compared
  as exact strings, before anything is imported or looked up;
* refuses every qualname containing a dot, even if a caller put one in the list;
* looks the object up as one entry of the imported module's own ``__dict__`` (never
  ``getattr``, so no attribute chains and no module ``__getattr__`` hooks);
* checks what it found: a class, a :class:`torch.dtype`, or a plain Python function whose
  ``__module__`` and ``__qualname__`` are exactly the pair (a builtin such as
  ``os.system`` or a re-exported function is refused);
* never resolves persistent ids (``PERSID``/``BINPERSID`` fail), and refuses ``BUILD`` on
  a class or function (``BUILD`` with slot state is ``setattr``: on a class, it would rewrite
  that class for the whole process); ``BUILD`` on instances, as dataclasses need, is kept.

It is pickle's pure-Python unpickler (``pickle._Unpickler``), whose opcode table can be
changed; metadata files are small, so its speed does not matter.

Anything refused raises :class:`~mergekit_ota.errors.CurvatureError` naming the file and
the global.  A *substitute* (:data:`DCP_METADATA_SUBSTITUTES`) maps an exact pair to a fixed,
harmless object without importing anything.

Which loaders in this package unpickle, and under which allow-list
------------------------------------------------------------------
=================================================  ======================================================
``export.dcp`` ``.metadata`` of a DCP directory     :func:`restricted_load` with :data:`DCP_METADATA_GLOBALS`
``export.dcp`` bytes items (param-group values)     ``torch.load(weights_only=True)``: torch's own allow-list
``export.dcp`` tensors (``dcp.load`` of one key)     torch's ``FileSystemReader.read_data``:
                                                     ``torch.load(weights_only=True)`` of the tensor's bytes
``export.torch_state.load_torch_file``               ``torch.load(mmap=True, weights_only=True)``: torch's own
(``optimizer.pt``/``.bin``, ``torch.save`` files)    allow-list
``export.zero`` (native DeepSpeed ZeRO ``*_optim_     ``torch.load(mmap=True, weights_only=True)`` plus the
states.pt``/``*_model_states.pt``), ``export.        exact stand-ins of :data:`DEEPSPEED_STAND_INS`
universal`` (``ds_to_universal``'s ``*.pt``)          (:func:`deepspeed_globals`)
=================================================  ======================================================

Nothing in the package calls ``torch.load`` without ``weights_only=True``; torch's allow-list
is widened only here, only for the duration of one load (:func:`deepspeed_globals`, never
``add_safe_globals``), and only by inert stand-ins defined in this module under the exact
names DeepSpeed's pickles use; ``tests/test_unpickle.py`` checks all of it over the package's source.  Curvature stores
and
model weights are read with safetensors, configs as JSON.  (A merge reads model weights
through mergekit's own loaders, outside this package.)
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import importlib
import inspect
import pickle
from typing import IO, Any, Dict, FrozenSet, Iterator, Mapping, Optional, Sequence, Tuple

from mergekit_ota.errors import CurvatureError

Pair = Tuple[str, str]

_DCP_METADATA = "torch.distributed.checkpoint.metadata"
_DCP_FILESYSTEM = "torch.distributed.checkpoint.filesystem"

# Canonical names of torch dtypes (``str(dtype)`` without ``torch.``): a dtype pickles as the
# global ``("torch", name)``.  A fixed list, so that no other attribute of ``torch`` can be named.
TORCH_DTYPE_NAMES: Tuple[str, ...] = (
    "float32",
    "float64",
    "float16",
    "bfloat16",
    "complex32",
    "complex64",
    "complex128",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "int8",
    "int16",
    "int32",
    "int64",
    "bool",
    "float8_e4m3fn",
    "float8_e4m3fnuz",
    "float8_e5m2",
    "float8_e5m2fnuz",
    "float8_e8m0fnu",
    "float4_e2m1fn_x2",
    "qint8",
    "quint8",
    "qint32",
    "quint4x2",
    "quint2x4",
)

DCP_METADATA_GLOBALS: FrozenSet[Pair] = frozenset(
    {
        # the dataclasses torch.distributed.checkpoint pickles into .metadata (metadata.py):
        (_DCP_METADATA, "Metadata"),  # the whole file: state_dict_metadata, planner_data, storage_data, ...
        (_DCP_METADATA, "TensorStorageMetadata"),  # one tensor entry: properties, size, chunks
        (_DCP_METADATA, "BytesStorageMetadata"),  # one non-tensor (torch.save'd bytes) entry
        (_DCP_METADATA, "ChunkStorageMetadata"),  # offsets and sizes of one saved chunk
        (_DCP_METADATA, "TensorProperties"),  # a tensor's dtype, layout, requires_grad, ...
        (_DCP_METADATA, "_MEM_FORMAT_ENCODING"),  # the Enum TensorProperties pickles its memory format as
        (_DCP_METADATA, "MetadataIndex"),  # keys of storage_data
        (_DCP_METADATA, "StorageMeta"),  # checkpoint_id, save_id, load_id, modules
        (_DCP_FILESYSTEM, "_StorageInfo"),  # values of storage_data: relative_path, offset, length
        ("torch", "Size"),  # tensor sizes, chunk offsets and sizes
        ("torch.serialization", "_get_layout"),  # how a torch.layout pickles: _get_layout("torch.strided")
        # StorageMeta.checkpoint_id when dcp.save was given a pathlib.Path (see DCP_METADATA_SUBSTITUTES)
        ("pathlib", "PosixPath"),
        ("pathlib", "WindowsPath"),
        ("pathlib._local", "PosixPath"),  # Python 3.13 names path classes under pathlib._local
        ("pathlib._local", "WindowsPath"),
        *(("torch", name) for name in TORCH_DTYPE_NAMES),  # TensorProperties.dtype
    }
)
"""The globals a ``.metadata`` written by ``torch.distributed.checkpoint`` (torch 2.13) names.

Derived by saving real checkpoints (FSDP-style ``get_state_dict`` of a model and its
optimizer, plain state dicts, bytes items, every common dtype, several writer options,
``str`` and ``pathlib.Path`` checkpoint ids) and recording every ``find_class`` call;
``tests/test_unpickle.py`` repeats that derivation and checks that the recorded globals are
a subset of these pairs.  Added beyond what that records: the dtype names not saved there,
the Windows path class, and the Python 3.13 spelling of the path classes."""


def _path_substitutes() -> Dict[Pair, Any]:
    """The path pairs of :data:`DCP_METADATA_GLOBALS` as their pure counterparts."""
    import pathlib

    pure = {"PosixPath": pathlib.PurePosixPath, "WindowsPath": pathlib.PureWindowsPath}
    return {(module, name): cls for module in ("pathlib", "pathlib._local") for name, cls in pure.items()}


DCP_METADATA_SUBSTITUTES: Mapping[Pair, Any] = _path_substitutes()
"""Path classes read as pure paths: no I/O, and constructible on any OS and Python version.

``StorageMeta.checkpoint_id`` is informational only (the reader uses its own directory)
and a pure path holds the same string; a ``WindowsPath`` cannot be built on Linux (nor a
``PosixPath`` on Windows), and ``pathlib._local`` cannot be imported before Python 3.13."""


class RestrictedUnpickler(pickle._Unpickler):  # the pure-Python one: its BUILD can be guarded
    """An unpickler that resolves only the exact ``(module, qualname)`` pairs in ``allowed``.

    ``source`` (the file's path) and ``what`` (e.g. ``"DCP metadata"``) name the input in
    errors.  ``substitutes`` maps allowed pairs to fixed objects returned without any import.
    See the module docstring for the checks.
    """

    def __init__(
        self,
        file: IO[bytes],
        allowed: FrozenSet[Pair],
        source: str,
        what: str,
        substitutes: Optional[Mapping[Pair, Any]] = None,
    ):
        super().__init__(file)
        self.allowed = frozenset(allowed)
        self.source = source
        self.what = what
        self.substitutes = dict(substitutes or {})

    def _refuse(self, module: str, name: str, why: str) -> CurvatureError:
        return CurvatureError(
            f"{self.source}: refusing to unpickle global '{module}.{name}' ({why}); "
            f"a {self.what} file may only name its {len(self.allowed)} allow-listed (module, name) pairs"
        )

    def find_class(self, module: str, name: str) -> Any:
        if "." in name:
            raise self._refuse(module, name, "a dotted name would be resolved through the module's attributes")
        if (module, name) not in self.allowed:
            raise self._refuse(module, name, f"not an object a {self.what} file holds")
        if (module, name) in self.substitutes:
            return self.substitutes[(module, name)]
        try:
            namespace = vars(importlib.import_module(module))
        except ImportError as error:
            raise self._refuse(module, name, f"cannot import {module}: {error}") from error
        if name not in namespace:
            raise self._refuse(module, name, f"{module} has no {name}")
        value = namespace[name]
        if not _expected_kind(value, module, name):
            raise self._refuse(
                module, name, f"it is a {type(value).__name__}, not a class, dtype or function of that name"
            )
        return value

    def persistent_load(self, pid: Any) -> Any:
        raise CurvatureError(f"{self.source}: refusing to unpickle a persistent id; a {self.what} file holds none")

    def load_build(self) -> None:
        """``BUILD``, refused on a class or function (it would set attributes of the class itself)."""
        target = self.stack[-2]  # BUILD pops the state; the object it updates is below it
        if isinstance(target, type) or inspect.isroutine(target):
            what = f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', '?')}"
            raise CurvatureError(
                f"{self.source}: refusing to unpickle BUILD on '{what}' itself (it would set attributes of "
                f"that {'class' if isinstance(target, type) else 'function'}); a {self.what} file builds only instances"
            )
        super().load_build()

    dispatch = dict(pickle._Unpickler.dispatch)  # type: ignore[attr-defined]
    dispatch[pickle.BUILD[0]] = load_build


def _expected_kind(value: Any, module: str, name: str) -> bool:
    """A class, a torch dtype, or a plain function defined as exactly ``module.name``."""
    if isinstance(value, type):
        return True
    import torch

    if isinstance(value, torch.dtype):
        return True
    return inspect.isfunction(value) and value.__module__ == module and value.__qualname__ == name


def restricted_load(
    fp: IO[bytes],
    allowed: FrozenSet[Pair],
    source_path: str,
    what: str,
    substitutes: Optional[Mapping[Pair, Any]] = None,
) -> Any:
    """Unpickle ``fp`` with :class:`RestrictedUnpickler`; every failure is a :class:`CurvatureError`.

    A refused global names ``source_path`` and the global; a damaged or truncated pickle
    (or one whose allowed objects reject their arguments) says the file is not a readable ``what``.
    """
    try:
        return RestrictedUnpickler(fp, allowed, source_path, what, substitutes).load()
    except CurvatureError:
        raise
    except Exception as error:  # noqa: BLE001 - UnpicklingError, EOFError, errors of allowed constructors
        detail = str(error) if len(str(error)) <= 200 else str(error)[:200] + "..."
        raise CurvatureError(f"{source_path}: not a readable {what} file ({type(error).__name__}: {detail})") from error


# ----------------------------------------------------------------------------- DeepSpeed checkpoints


class ZeroStageEnum(enum.IntEnum):
    """Stand-in for ``deepspeed.runtime.zero.config.ZeroStageEnum`` (an ``int`` Enum): the ZeRO stage."""

    disabled = 0
    optimizer_states = 1
    gradients = 2
    weights = 3


@dataclasses.dataclass
class FragmentAddress:
    """Stand-in for ``deepspeed.utils.tensor_fragment.fragment_address``: where one parameter's
    fragment lies in a rank's flat partition (``start``) and how long it is (``numel``)."""

    numel: int = 0
    start: int = 0


class LossScalerState:
    """Stand-in for DeepSpeed's ``LossScaler``/``DynamicLossScaler``: an inert holder of the
    attributes the pickle sets (``cur_scale``, ``dynamic``, ...); no method of the original exists."""

    def __repr__(self) -> str:
        return f"LossScalerState({vars(self)})"


DEEPSPEED_STAND_INS: Tuple[Tuple[Any, str], ...] = (
    (ZeroStageEnum, "deepspeed.runtime.zero.config.ZeroStageEnum"),  # optimizer_state_dict['zero_stage']
    (FragmentAddress, "deepspeed.utils.tensor_fragment.fragment_address"),  # param_slice_mappings (stages 1/2, bf16)
    (LossScalerState, "deepspeed.runtime.fp16.loss_scaler.LossScaler"),  # optimizer_state_dict['loss_scaler']
    (LossScalerState, "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler"),  # the same, fp16 dynamic scaling
)
"""The globals DeepSpeed 0.19 checkpoints name beyond torch's own allow-list, each as an inert stand-in.

Derived from the real checkpoints in ``tests/fixtures/deepspeed`` (every stage, precision and world
size ``generate.py`` writes, and ``ds_to_universal``'s ``optimizer_state.pt``): ``tests/test_unpickle.py``
lists every global those pickles name and checks that each is torch's own or one of these."""


TORCHAO_CLASSES: Dict[str, str] = {
    "ao8": "torchao.optim.subclass_8bit.OptimState8bit",
    "ao4": "torchao.optim.subclass_4bit.OptimState4bit",
    "aofp8": "torchao.optim.subclass_fp8.OptimStateFp8",
}
"""The globals a torchao 0.18 low-bit AdamW state dict names beyond torch's own allow-list (read from the pickles
of ``tests/fixtures/optimizers/torchao``), by format; :mod:`mergekit_ota.export.torchao` maps each to an inert
``torch.Tensor`` stand-in that only holds the inner tensors the pickle sets. Nothing of torchao is imported."""


@contextlib.contextmanager
def allow_stand_ins(pairs: Sequence[Tuple[Any, str]]) -> Iterator[None]:
    """Within the block, ``torch.load(weights_only=True)`` also resolves each exact ``"module.qualname"`` of
    ``pairs`` to the stand-in object given with it; only the names of :data:`DEEPSPEED_STAND_INS` and
    :data:`TORCHAO_CLASSES` are accepted (one audited allow-list)."""
    import torch

    allowed = {name for _, name in DEEPSPEED_STAND_INS} | set(TORCHAO_CLASSES.values())
    unknown = [name for _, name in pairs if name not in allowed]
    if unknown:
        raise ValueError(f"not an allow-listed stand-in name: {unknown}")
    with torch.serialization.safe_globals(list(pairs)):
        yield


@contextlib.contextmanager
def deepspeed_globals() -> Iterator[None]:
    """Within the block, ``torch.load(weights_only=True)`` also accepts :data:`DEEPSPEED_STAND_INS`.

    Each entry maps one exact ``"module.qualname"`` string (compared whole, so no attribute
    chain can be named) to a class of this module; nothing of DeepSpeed is imported.
    """
    with allow_stand_ins(DEEPSPEED_STAND_INS):
        yield
