"""The .pth reader on crafted and damaged files: it must not hang, be poisoned, or fail
with a bare error that names neither the file nor the fix. All files are hand-written;
no torch needed."""

import contextlib
import pickle
import re
import signal
import struct
import time
import tracemalloc
import zipfile

import numpy as np
import pytest

from fgjax.models import efficientnet_lite
from fgjax.models import pretrained
from fgjax.models import pth_reader
from tests.test_pretrained import (_VIEWS, _handmade_state_pickle, _legacy_bytes,
                                   _op_global, _op_str, _zip_file)

_DATA = np.arange(6, dtype="<f4").tobytes()


def _legacy_file(path, obj_pickle: bytes, numel: int = 6):
  """A legacy file whose one storage '0' says it holds `numel` elements."""
  raw = _legacy_bytes(obj_pickle)
  raw = raw[:-len(pickle.dumps([], protocol=2))] + pickle.dumps(["0"], protocol=2)
  path.write_bytes(raw + struct.pack("<q", numel) + _DATA)


def _zip_with_storage(path, obj_pickle: bytes):
  with zipfile.ZipFile(path, "w") as zf:
    zf.writestr("a/data.pkl", obj_pickle)
    zf.writestr("a/data/0", _DATA)


def _tensor_ops() -> bytes:
  """Opcodes pushing one tensor over storage '0' (cut out of the shared helper)."""
  # Drop the leading '\x80\x02}(' and trailing 'u.', then the key.
  items = _handmade_state_pickle({"t": (0, (6,), (1,))})[4:-2]
  return items[len(_op_str("t")):]


def _put(i: int) -> bytes:
  return b"r" + struct.pack("<I", i)


def _get(i: int) -> bytes:
  return b"j" + struct.pack("<I", i)


@contextlib.contextmanager
def _deadline(seconds: float):
  """Turns a hang into a failure instead of a stuck test run.

  The alarm repeats: one that lands in a finaliser (the walk allocates heavily, so the
  GC runs often) is printed and dropped rather than raised.
  """
  def expire(signum, frame):
    del signum, frame
    raise TimeoutError(f"still running after {seconds} s")

  previous = signal.signal(signal.SIGALRM, expire)
  signal.setitimer(signal.ITIMER_REAL, seconds, 1)
  try:
    yield
  finally:
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, previous)


def test_shared_lists_load_in_linear_time(tmp_path):
  # L(i+1) = [L(i), L(i)]: 60 levels are ~1 KB of pickle but 2**60 leaves unfolded.
  levels = b"".join(b"(" + _get(i) + _get(i) + b"l" + _put(i + 1) + b"0"  # 0: POP
                   for i in range(60))
  obj = (b"\x80\x02}" + _op_str("deep") + _tensor_ops() + _put(0) + b"0" + levels +
         _get(60) + b"s" + _op_str("flat") + _get(0) + b"s.")
  assert len(obj) < 1500
  path = tmp_path / "deep.pth"
  _zip_with_storage(path, obj)
  with _deadline(10):
    start = time.perf_counter()
    state = pth_reader.load_pth(path)
    elapsed = time.perf_counter() - start
  assert elapsed < 2
  node = state["deep"]
  for _ in range(60):
    assert isinstance(node, list) and len(node) == 2
    assert node[0] is node[1]  # Shared in the file, shared in the result.
    node = node[0]
  assert node is state["flat"]
  np.testing.assert_array_equal(node, np.arange(6))


@pytest.mark.parametrize("obj, problem", [
    (b"\x80\x02]" + _put(0) + _get(0) + b"a.", "cycle"),            # [[...]]
    (b"\x80\x02}" + _put(0) + _op_str("k") + _get(0) + b"s.", "cycle"),  # {'k': ...}
    (b"\x80\x02" + b"]" * 5000 + b"a" * 4999 + b".", "deeper than"),
], ids=["list_cycle", "dict_cycle", "5000_levels"])
def test_cycles_and_absurd_nesting_are_clear_errors(obj, problem, tmp_path):
  path = tmp_path / "nested.pth"
  _zip_file(path, obj)
  with pytest.raises(ValueError, match=problem) as e:
    pth_reader.load_pth(path)
  assert str(path) in str(e.value)


_BUILD_TARGETS = {
    "storage_type": _op_global("torch", "FloatStorage"),
    "rebuild_fn": _op_global("torch._utils", "_rebuild_tensor_v2"),
    "ordered_dict": _op_global("collections", "OrderedDict"),
    "tensor": _tensor_ops(),
}
_STATE = b"}" + _op_str("dtype") + _op_str("not a dtype") + b"s"
_BUILD_STATES = {"dict": _STATE, "slots": b"N" + _STATE + b"\x86"}


@pytest.mark.parametrize("state", _BUILD_STATES)
@pytest.mark.parametrize("target", _BUILD_TARGETS)
def test_build_on_stand_ins_is_refused_and_poisons_nothing(target, state, tmp_path):
  evil = tmp_path / "evil.pth"
  _zip_with_storage(evil, b"\x80\x02" + _BUILD_TARGETS[target] + _BUILD_STATES[state] +
                    b"b.")
  with pytest.raises(pickle.UnpicklingError,
                     match="refusing to set pickled attributes") as e:
    pth_reader.load_pth(evil)
  assert str(evil) in str(e.value)
  # Later loads in this process still see intact stand-ins.
  good = tmp_path / "good.pth"
  _legacy_file(good, _handmade_state_pickle(_VIEWS))
  np.testing.assert_array_equal(pth_reader.load_pth(good)["a"], [[0, 1, 2], [3, 4, 5]])
  lite0 = pth_reader.load_pth(efficientnet_lite.default_weights_path())
  assert lite0["_conv_stem.weight"].dtype == np.float32


@pytest.mark.parametrize("numel", [2**40, 2**28])
def test_huge_legacy_storage_claim_is_checked_before_allocating(numel, tmp_path):
  path = tmp_path / "huge.pth"
  _legacy_file(path, _handmade_state_pickle(_VIEWS), numel=numel)
  tracemalloc.start()
  try:
    with pytest.raises(ValueError, match=f"claims {numel} elements.*re-download") as e:
      pth_reader.load_pth(path)
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  assert str(path) in str(e.value)
  assert peak < 16 << 20


def _assert_every_prefix_is_a_clear_error(path, raw: bytes):
  for n in range(len(raw)):
    path.write_bytes(raw[:n])
    with pytest.raises(ValueError, match=r"truncated|empty") as e:
      pth_reader.load_pth(path)
    assert str(path) in str(e.value), (n, str(e.value))


@pytest.mark.parametrize("write", [_legacy_file, _zip_with_storage],
                         ids=["legacy", "zip"])
def test_truncated_file_is_a_clear_error(tmp_path, write):
  path = tmp_path / "full.pth"
  write(path, _handmade_state_pickle(_VIEWS))
  raw = path.read_bytes()
  assert pth_reader.load_pth(path)["c"].tolist() == [4, 5]
  _assert_every_prefix_is_a_clear_error(tmp_path / "cut.pth", raw)


def test_empty_file_is_a_clear_error(tmp_path):
  path = tmp_path / "empty.pth"
  path.write_bytes(b"")
  with pytest.raises(ValueError, match=re.escape(f"{path}: the file is empty")):
    pth_reader.load_pth(path)


def _lie_about_entry_size(raw: bytes, name: str, size: int) -> bytes:
  """Rewrites `name`'s sizes in the zip central directory (what zipfile trusts)."""
  at = raw.index(b"PK\x01\x02")
  while raw[at + 46:at + 46 + len(name)] != name.encode():
    at = raw.index(b"PK\x01\x02", at + 4)
  sizes = struct.pack("<II", size, size)  # compressed, uncompressed
  return raw[:at + 20] + sizes + raw[at + 28:]


@pytest.mark.parametrize("damage", ["entry_size", "pickle"])
def test_damaged_zip_contents_are_a_clear_error(damage, tmp_path):
  path = tmp_path / "damaged.pth"
  obj = _handmade_state_pickle(_VIEWS)
  if damage == "entry_size":
    _zip_with_storage(path, obj)
    path.write_bytes(_lie_about_entry_size(path.read_bytes(), "a/data/0", 0x7FFFFFF0))
  else:
    _zip_with_storage(path, obj[:len(obj) // 2])
  with pytest.raises(ValueError, match="truncated or corrupt") as e:
    pth_reader.load_pth(path)
  assert str(path) in str(e.value)


def _bn_conv_state():
  return {"c.weight": np.zeros((4, 3, 1, 1)), "c.bias": np.zeros(4),
          "b.weight": np.ones(4), "b.bias": np.zeros(4),
          "b.running_mean": np.zeros(4), "b.running_var": np.ones(4)}


@pytest.mark.parametrize("drop", ["b.running_var", "b.running_mean", "c.weight"])
def test_missing_layer_tensor_is_a_clear_error(drop):
  state = {k: v for k, v in _bn_conv_state().items() if k != drop}
  key_map = {"c": ("conv",), "b": ("bn",)}.get
  with pytest.raises(ValueError, match=re.escape(f"lacks ['{drop}']")) as e:
    pretrained.state_dict_to_flax(state, key_map, {}, "t.pth")
  assert "t.pth" in str(e.value) and "architecture" in str(e.value)
