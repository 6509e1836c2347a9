"""Reading PyTorch .pth state_dicts without torch and without running pickle code.

`load_pth(path)` handles both serialisation formats of `torch.save`:

* legacy (torch < 1.6, or `_use_new_zipfile_serialization=False`): a sequence of pickles
  (magic number, protocol version, sys info, the object with storages as persistent ids,
  the list of storage keys) followed, per storage key, by an int64 element count and the
  raw little-endian storage bytes;
* zip (default since torch 1.6): `<archive>/data.pkl` with persistent ids naming the
  entries `<archive>/data/<key>` that hold the raw storage bytes (`<archive>/byteorder`
  says 'little' or 'big').

Unpickling runs through `RestrictedUnpickler`, whose `find_class` resolves only an
allow-list of globals to *our own* inert stand-ins (never to torch or to arbitrary
callables), so a malicious file cannot execute code: any other global raises
`pickle.UnpicklingError` naming it, before anything is called. Each lookup gets a fresh
stand-in that refuses BUILD, so a file cannot rewrite them for itself or for later
loads. Tensors become NumPy arrays honouring storage offset, size, stride and dtype;
objects the pickle shares are converted once, so a small file cannot unfold into an
exponentially large tree. Damaged files raise ValueError naming the file and the fix.

`fgjax.models.pretrained` maps the result onto flax trees.
"""

import collections
import io
import os
import pickle
import struct
import zipfile
import zlib
from typing import Any, Callable, Optional

import ml_dtypes
import numpy as np

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

# Storage class name -> NumPy dtype (little-endian).
_STORAGE_DTYPES = {
    "FloatStorage": np.dtype("<f4"), "DoubleStorage": np.dtype("<f8"),
    "HalfStorage": np.dtype("<f2"), "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype("<i8"), "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"), "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"), "BoolStorage": np.dtype("?"),
}


class RefusedPickleError(pickle.UnpicklingError):
  """The pickle asks for something a plain state_dict never needs; nothing of it ran."""


class _NoBuild:
  """Refuses BUILD, pickle's hook for restoring an object's attributes.

  Torch state_dicts only BUILD their OrderedDicts; honouring it on our objects would let
  a file rewrite the fields this reader trusts (a storage's dtype, a view's offset).
  """

  __slots__ = ()

  def __setstate__(self, state):
    raise RefusedPickleError(
        f"{self.source}: refusing to set pickled attributes on {self!r}: a torch "
        "state_dict never does this, so the file is malformed or malicious.")


class _StorageType(_NoBuild):
  """Stand-in for torch.<X>Storage: only carries the dtype."""

  __slots__ = ("name", "dtype", "source")

  def __init__(self, name: str, source: str):
    self.name, self.dtype, self.source = name, _STORAGE_DTYPES[name], source

  def __repr__(self):
    return f"torch.{self.name}"


class _Global(_NoBuild):
  """Stand-in for an allow-listed callable global (one per lookup, never shared)."""

  __slots__ = ("qualname", "fn", "source")

  def __init__(self, qualname: str, fn: Callable[..., Any], source: str):
    self.qualname, self.fn, self.source = qualname, fn, source

  def __call__(self, *args, **kwargs):
    return self.fn(self.source, *args, **kwargs)

  def __repr__(self):
    return self.qualname


class _Storage(_NoBuild):
  """A storage's flat data, filled in after the pickle is read."""

  __slots__ = ("dtype", "numel", "source", "data")

  def __init__(self, dtype: np.dtype, numel: int, source: str):
    self.dtype, self.numel, self.source = dtype, numel, source
    self.data: Optional[np.ndarray] = None

  def __repr__(self):
    return f"a {self.dtype} storage"


class _LazyTensor(_NoBuild):
  """Tensor view into a storage, materialised once all storage bytes are read."""

  __slots__ = ("storage", "offset", "size", "stride", "source")

  def __init__(self, storage: _Storage, offset: int, size: tuple, stride: tuple):
    self.storage, self.offset, self.size, self.stride = storage, offset, size, stride
    self.source = storage.source

  def __repr__(self):
    return f"a tensor of size {self.size}"

  def materialise(self) -> np.ndarray:
    flat = self.storage.data
    if flat is None:
      raise pickle.UnpicklingError(
          f"{self.source}: a tensor refers to a storage with no data.")
    if any(n < 0 for n in self.size) or any(s < 0 for s in self.stride):
      raise pickle.UnpicklingError(
          f"{self.source}: bad tensor size {self.size} / stride {self.stride}.")
    if 0 in self.size:
      return np.zeros(self.size, flat.dtype.newbyteorder("="))
    last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride))
    if self.offset < 0 or last >= flat.size:
      raise pickle.UnpicklingError(
          f"{self.source}: tensor view (offset {self.offset}, size {self.size}, stride "
          f"{self.stride}) runs past its storage of {flat.size} elements.")
    view = np.lib.stride_tricks.as_strided(
        flat[self.offset:], shape=self.size,
        strides=tuple(s * flat.dtype.itemsize for s in self.stride), writeable=False)
    return np.array(view, dtype=flat.dtype.newbyteorder("="))


def _rebuild_tensor_v2(source, storage, storage_offset, size, stride,
                       requires_grad=False, backward_hooks=None, metadata=None):
  """Stand-in for torch._utils._rebuild_tensor_v2: a lazy view description."""
  del requires_grad, backward_hooks, metadata
  if not isinstance(storage, _Storage):
    raise RefusedPickleError(f"{source}: _rebuild_tensor_v2 got {storage!r}, expected "
                             "a tensor storage.")
  return _LazyTensor(storage, int(storage_offset), tuple(int(s) for s in size),
                     tuple(int(s) for s in stride))


def _rebuild_parameter(source, data, requires_grad=False, backward_hooks=None,
                       state=None):
  del source, requires_grad, backward_hooks, state
  return data


def _ordered_dict(source, *args):
  del source
  return collections.OrderedDict(*args)


# (module, name) -> what its stand-in calls, with the file name first. Nothing here can
# run code beyond building containers.
_ALLOWED_CALLABLES: dict[tuple[str, str], Callable[..., Any]] = {
    ("collections", "OrderedDict"): _ordered_dict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
}

# Errors the pickle machinery raises on bytes that are cut short or garbled
# (MemoryError: a length field claiming more than exists, allocated before reading).
_CORRUPT_PICKLE_ERRORS = (pickle.UnpicklingError, EOFError, ValueError, TypeError,
                          AttributeError, IndexError, KeyError, OverflowError,
                          MemoryError)


def _corrupt(source: str, what: str) -> ValueError:
  return ValueError(f"{source}: {what}; the file is truncated or corrupt (an "
                    "interrupted download or copy?): re-download it.")


class RestrictedUnpickler(pickle.Unpickler):
  """Unpickler whose globals are an allow-list of inert stand-ins.

  Every lookup gets a fresh stand-in that refuses BUILD, so no file can alter what a
  later load in the same process sees. Persistent ids ('storage', <storage type>, key,
  location, numel[, view]) become `_Storage` objects registered in `self.storages`
  under their key.
  """

  def __init__(self, file, source: str):
    super().__init__(file)
    self.source = source
    self.storages: dict[str, _Storage] = {}

  def find_class(self, module: str, name: str):
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(name, self.source)
    fn = _ALLOWED_CALLABLES.get((module, name))
    if fn is not None:
      return _Global(f"{module}.{name}", fn, self.source)
    raise RefusedPickleError(
        f"{self.source}: refusing to unpickle global '{module}.{name}': only tensor "
        "state_dicts (torch tensors, storages, OrderedDict) are allowed. The file may "
        "be malicious, or be a whole pickled model rather than a state_dict.")

  def persistent_load(self, pid):
    if (not isinstance(pid, tuple) or len(pid) < 5 or pid[0] != "storage" or
        not isinstance(pid[1], _StorageType)):
      raise RefusedPickleError(f"{self.source}: unsupported persistent id {pid!r}.")
    _, storage_type, key, _, numel = pid[:5]
    if len(pid) > 5 and pid[5] is not None:
      raise RefusedPickleError(f"{self.source}: storage views are not supported.")
    if not isinstance(numel, int) or numel < 0:
      raise RefusedPickleError(f"{self.source}: bad storage size {numel!r}.")
    key = str(key)
    if key not in self.storages:
      self.storages[key] = _Storage(storage_type.dtype, numel, self.source)
    return self.storages[key]

  def load(self):
    """Unpickles; refusals pass through, damaged bytes become a ValueError.

    Raises:
      RefusedPickleError: the pickle asks for something outside the allow-list.
      ValueError: the pickle is cut short or garbled.
    """
    try:
      return super().load()
    except RefusedPickleError:
      raise
    except _CORRUPT_PICKLE_ERRORS as e:
      raise _corrupt(self.source, f"unreadable pickle ({type(e).__name__}: {e})") from e


# A state_dict nests a few levels; far deeper means a crafted file (and would exhaust
# Python's recursion limit).
_MAX_DEPTH = 100


def _materialise(obj: Any, source: str) -> Any:
  """Replaces lazy tensors by arrays, converting each shared object once.

  Pickles share objects by reference, so a small file can describe a DAG whose
  unfolded tree is exponentially large; memoising by identity keeps this linear in the
  file and keeps the sharing in the result.
  """
  memo: dict[int, Any] = {}
  active: set[int] = set()

  def walk(o: Any, depth: int) -> Any:
    if not isinstance(o, (_LazyTensor, dict, list, tuple)):
      return o
    if id(o) in memo:
      return memo[id(o)]
    if id(o) in active:
      raise ValueError(f"{source}: the pickled object contains itself (a cycle); a "
                       "state_dict never does: the file is malformed or malicious.")
    if depth > _MAX_DEPTH:
      raise ValueError(f"{source}: the pickled object nests deeper than {_MAX_DEPTH} "
                       "levels; a state_dict never does: the file is malformed or "
                       "malicious.")
    active.add(id(o))
    if isinstance(o, _LazyTensor):
      out = o.materialise()
    elif isinstance(o, dict):
      out = collections.OrderedDict()
      for k, v in o.items():
        out[k] = walk(v, depth + 1)
    else:
      items = []
      for v in o:
        items.append(walk(v, depth + 1))
      out = type(o)(items)
    active.discard(id(o))
    memo[id(o)] = out
    return out

  return walk(obj, 0)


def _load_legacy(f, source: str) -> Any:
  def plain(what: str):
    return RestrictedUnpickler(f, f"{source} ({what})").load()

  magic = plain("magic number")
  if magic != _LEGACY_MAGIC:
    raise ValueError(f"{source}: not a PyTorch file (bad magic number).")
  protocol = plain("protocol version")
  if protocol != _LEGACY_PROTOCOL:
    raise ValueError(f"{source}: unsupported legacy protocol version {protocol!r}.")
  sys_info = plain("sys info")
  if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
    raise ValueError(f"{source}: big-endian legacy files are not supported.")
  unpickler = RestrictedUnpickler(f, source)
  obj = unpickler.load()
  keys = plain("storage keys")
  if not isinstance(keys, list):
    raise _corrupt(source, f"the storage key list is a {type(keys).__name__}")
  file_size = os.fstat(f.fileno()).st_size
  for key in keys:
    storage = unpickler.storages.get(str(key))
    if storage is None:
      raise ValueError(f"{source}: storage key {key!r} was not referenced.")
    count = f.read(8)
    if len(count) != 8:
      raise _corrupt(source, f"the file ends before storage {key!r}")
    (numel,) = struct.unpack("<q", count)
    nbytes = numel * storage.dtype.itemsize
    # Checked before reading: a read of the claimed size would allocate it first.
    remaining = file_size - f.tell()
    if not 0 <= nbytes <= remaining:
      raise _corrupt(source, f"storage {key!r} claims {numel} elements ({nbytes} "
                     f"bytes) but only {remaining} bytes remain")
    storage.data = np.frombuffer(f.read(nbytes), storage.dtype)
  return _materialise(obj, source)


def _load_zip(path: str, source: str) -> Any:
  try:
    with zipfile.ZipFile(path) as zf:
      return _read_zip(zf, os.path.getsize(path), source)
  except (zipfile.BadZipFile, zlib.error, EOFError) as e:
    raise _corrupt(source, f"damaged zip archive ({e})") from e


def _read_zip(zf: zipfile.ZipFile, archive_size: int, source: str) -> Any:
  infos = {info.filename: info for info in zf.infolist()}
  # A directory claiming more bytes than the archive holds would make zipfile allocate
  # the claim before finding out.
  for info in infos.values():
    if info.header_offset + info.compress_size > archive_size:
      raise _corrupt(source, f"zip entry {info.filename} claims {info.compress_size} "
                     f"bytes but the archive has {archive_size}")
  pkl = [n for n in infos if n.endswith("/data.pkl") or n == "data.pkl"]
  if len(pkl) != 1:
    raise ValueError(f"{source}: zip archive without a single data.pkl "
                     f"({list(infos)[:5]}).")
  prefix = pkl[0][:-len("data.pkl")]
  big_endian = False
  if prefix + "byteorder" in infos:
    big_endian = zf.read(prefix + "byteorder").strip() == b"big"
  unpickler = RestrictedUnpickler(io.BytesIO(zf.read(pkl[0])), source)
  obj = unpickler.load()
  for key, storage in unpickler.storages.items():
    entry = f"{prefix}data/{key}"
    if entry not in infos:
      raise ValueError(f"{source}: missing storage entry {entry}.")
    dtype = storage.dtype.newbyteorder(">") if big_endian else storage.dtype
    nbytes = storage.numel * dtype.itemsize
    if infos[entry].file_size < nbytes:
      raise _corrupt(source, f"storage entry {entry} has {infos[entry].file_size} "
                     f"bytes but the pickle claims {storage.numel} elements ({nbytes} "
                     "bytes)")
    with zf.open(entry) as f:
      raw = f.read(nbytes)
    if len(raw) != nbytes:
      raise _corrupt(source, f"storage entry {entry} ends after {len(raw)} bytes")
    storage.data = np.frombuffer(raw, dtype)
  return _materialise(obj, source)


def load_pth(path: "str | os.PathLike") -> Any:
  """Reads a torch.save'd state_dict into {name: np.ndarray} without importing torch.

  Args:
    path: a .pth/.pt file in either the zip or the legacy torch.save format.

  Returns:
    The unpickled object (normally an OrderedDict of parameter name -> array).

  Raises:
    FileNotFoundError: no such file.
    RefusedPickleError: (a pickle.UnpicklingError) the pickle references a global
      outside the allow-list or tries to set attributes on the reader's objects
      (nothing from the file is executed).
    pickle.UnpicklingError: a tensor view does not fit its storage.
    ValueError: the file is truncated, corrupt, or not a PyTorch serialisation we
      understand; the message names the file and the problem.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"weights file not found: {path}")
  if zipfile.is_zipfile(path):
    return _load_zip(path, path)
  with open(path, "rb") as f:
    head = f.read(2)
    if not head:
      raise _corrupt(path, "the file is empty")
    if head == b"PK":  # Legacy files start with a pickle, never with a zip signature.
      raise _corrupt(path, "the file starts like a zip archive (torch.save's default "
                     "format) but has no zip directory at its end")
    f.seek(0)
    return _load_legacy(f, path)
