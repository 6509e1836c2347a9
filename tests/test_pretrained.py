"""Safe .pth reader (both torch.save formats), key maps and the weight cache."""

import hashlib
import io
import os
import pickle
import struct
import zipfile

import numpy as np
import pytest

from fgjax import models
from fgjax.models import efficientnet_lite
from fgjax.models import pretrained
from fgjax.models import pth_reader

_MAGIC = 0x1950A86A20F9469CFC6C


class _Evil:
  """Unpickling this would run a shell command that creates `marker`."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


def _legacy_bytes(obj_pickle: bytes, first: object = _MAGIC) -> bytes:
  buf = io.BytesIO()
  pickle.dump(first, buf, protocol=2)
  pickle.dump(1001, buf, protocol=2)
  pickle.dump({"protocol_version": 1001, "little_endian": True}, buf, protocol=2)
  buf.write(obj_pickle)
  pickle.dump([], buf, protocol=2)
  return buf.getvalue()


def _zip_file(path, obj_pickle: bytes):
  with zipfile.ZipFile(path, "w") as zf:
    zf.writestr("archive/data.pkl", obj_pickle)
    zf.writestr("archive/byteorder", "little")


@pytest.mark.parametrize("fmt", ["legacy", "legacy_magic", "zip"])
def test_malicious_pickle_rejected_without_running(fmt, tmp_path):
  marker = tmp_path / "pwned"
  evil = pickle.dumps({"weight": _Evil(marker)}, protocol=2)
  path = tmp_path / "evil.pth"
  if fmt == "zip":
    _zip_file(path, evil)
  elif fmt == "legacy":
    path.write_bytes(_legacy_bytes(evil))
  else:  # The payload in the very first (magic number) pickle.
    path.write_bytes(_legacy_bytes(pickle.dumps({}), first=_Evil(marker)))
  with pytest.raises(pickle.UnpicklingError, match=r"(posix|os|nt)\.system"):
    pth_reader.load_pth(path)
  assert not marker.exists()


def test_not_a_torch_file(tmp_path):
  path = tmp_path / "x.pth"
  path.write_bytes(pickle.dumps(123) + b"junk")
  with pytest.raises(ValueError, match="magic number"):
    pth_reader.load_pth(path)
  with pytest.raises(FileNotFoundError, match="nope.pth"):
    pth_reader.load_pth(tmp_path / "nope.pth")


def test_shipped_lite0_file_is_legacy_and_reads():
  path = efficientnet_lite.default_weights_path()
  assert not zipfile.is_zipfile(path)
  state = pth_reader.load_pth(path)
  assert state["_conv_stem.weight"].shape == (32, 3, 3, 3)
  assert state["_blocks.4._depthwise_conv.weight"].shape == (240, 1, 5, 5)
  assert state["_fc.weight"].shape == (1000, 1280)
  assert state["_bn0.num_batches_tracked"].dtype == np.int64
  assert all(np.isfinite(v).all() for v in state.values())


def _op_str(s: str) -> bytes:
  return b"X" + struct.pack("<I", len(s)) + s.encode()


def _op_ints(*ints: int) -> bytes:
  return b"(" + b"".join(b"J" + struct.pack("<i", i) for i in ints) + b"t"


def _op_global(module: str, name: str) -> bytes:
  return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _handmade_state_pickle(views) -> bytes:
  """Protocol-2 opcodes for {name: tensor view} over one 6-element float32 storage '0'.

  Written from the torch.save format description, independently of the reader.
  """
  storage = (b"(" + _op_str("storage") + _op_global("torch", "FloatStorage") +
             _op_str("0") + _op_str("cpu") + b"J" + struct.pack("<i", 6) + b"tQ")
  items = b""
  for name, (offset, size, stride) in views.items():
    items += (_op_str(name) + _op_global("torch._utils", "_rebuild_tensor_v2") + b"(" +
              storage + b"J" + struct.pack("<i", offset) + _op_ints(*size) +
              _op_ints(*stride) + b"\x89}tR")
  return b"\x80\x02}(" + items + b"u."


_VIEWS = {"a": (0, (2, 3), (3, 1)), "b": (0, (3, 2), (1, 3)), "c": (4, (2,), (1,))}


@pytest.mark.parametrize("fmt", ["legacy", "zip"])
def test_handmade_files_views_offsets_strides(fmt, tmp_path):
  obj = _handmade_state_pickle(_VIEWS)
  data = np.arange(6, dtype="<f4").tobytes()
  path = tmp_path / "handmade.pth"
  if fmt == "legacy":
    raw = _legacy_bytes(obj)
    raw = raw[:-len(pickle.dumps([], protocol=2))] + pickle.dumps(["0"], protocol=2)
    path.write_bytes(raw + struct.pack("<q", 6) + data)
  else:
    with zipfile.ZipFile(path, "w") as zf:
      zf.writestr("any_prefix/data.pkl", obj)
      zf.writestr("any_prefix/data/0", data)
  state = pth_reader.load_pth(path)
  np.testing.assert_array_equal(state["a"], [[0, 1, 2], [3, 4, 5]])
  np.testing.assert_array_equal(state["b"], [[0, 3], [1, 4], [2, 5]])
  np.testing.assert_array_equal(state["c"], [4, 5])
  assert state["a"].dtype == np.float32


def test_view_past_storage_is_rejected(tmp_path):
  path = tmp_path / "bad.pth"
  with zipfile.ZipFile(path, "w") as zf:
    zf.writestr("a/data.pkl", _handmade_state_pickle({"x": (3, (2, 3), (3, 1))}))
    zf.writestr("a/data/0", np.arange(6, dtype="<f4").tobytes())
  with pytest.raises(pickle.UnpicklingError, match="runs past its storage"):
    pth_reader.load_pth(path)


@pytest.mark.parametrize("zip_format", [True, False])
def test_torch_round_trip(zip_format, tmp_path):
  torch = pytest.importorskip("torch", reason="round-trip needs torch.save")
  base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
  state = {
      "conv.weight": torch.randn(5, 3, 3, 3, generator=torch.Generator().manual_seed(0)),
      "transposed": base.t(),               # non-contiguous strides
      "slice": base[1:3, 2:5],              # storage offset + strides, shared storage
      "half": torch.tensor([1.5, -2.25], dtype=torch.float16),
      "long": torch.tensor([7, -3], dtype=torch.int64),
      "flag": torch.tensor([True, False]),
      "scalar": torch.tensor(3.0, dtype=torch.float64),
  }
  path = tmp_path / "rt.pth"
  torch.save(state, path, _use_new_zipfile_serialization=zip_format)
  assert zipfile.is_zipfile(path) == zip_format
  got = pth_reader.load_pth(path)
  assert list(got) == list(state)
  for k, v in state.items():
    assert got[k].dtype == v.numpy().dtype, k
    np.testing.assert_array_equal(got[k], v.numpy(), err_msg=k)


def test_state_dict_to_flax_layouts_and_errors():
  rng = np.random.default_rng(0)
  w = rng.normal(size=(4, 3, 2, 5)).astype(np.float32)   # OIHW
  fc = rng.normal(size=(7, 4)).astype(np.float32)        # (out, in)
  bn = {"weight": np.ones(4), "bias": np.zeros(4), "running_mean": np.arange(4.0),
        "running_var": np.full(4, 2.0), "num_batches_tracked": np.array(3)}
  state = {"c.weight": w, "fc.weight": fc, "fc.bias": np.arange(7.0),
           **{f"b.{k}": np.asarray(v) for k, v in bn.items()}}
  key_map = {"c": ("unit", "conv"), "b": ("unit", "bn"), "fc": ("head",)}.get
  template = {"params": {"unit": {"conv": {"kernel": np.zeros((2, 5, 3, 4))},
                                  "bn": {"scale": np.zeros(4), "bias": np.zeros(4)}},
                         "head": {"kernel": np.zeros((4, 7)), "bias": np.zeros(7)}},
              "batch_stats": {"unit": {"bn": {"mean": np.zeros(4), "var": np.zeros(4)}}}}
  out = pretrained.state_dict_to_flax(state, key_map, template, "t.pth")
  k = out["params"]["unit"]["conv"]["kernel"]
  # HWIO[h, w, i, o] == OIHW[o, i, h, w]
  assert k[1, 3, 2, 0] == w[0, 2, 1, 3]
  np.testing.assert_array_equal(out["params"]["head"]["kernel"], fc.T)
  np.testing.assert_array_equal(out["batch_stats"]["unit"]["bn"]["var"], 2.0)
  bad = dict(state, **{"fc.weight": fc[:, :3]})
  with pytest.raises(ValueError, match=r"'/head/kernel' has shape \(3, 7\)"):
    pretrained.state_dict_to_flax(bad, key_map, template, "t.pth")
  missing = {k: v for k, v in state.items() if not k.startswith("fc.")}
  with pytest.raises(ValueError, match=r"missing \['head'\]"):
    pretrained.state_dict_to_flax(missing, key_map, template, "t.pth")


def test_wrong_architecture_file_is_a_clear_error():
  path = efficientnet_lite.default_weights_path()
  with pytest.raises(ValueError, match="unexpected ResNet weight '_conv_stem'"):
    models.get("resnet18", pretrained=True, weights_path=path)


def test_offline_missing_weights_error(tmp_path, monkeypatch):
  monkeypatch.setenv("FGJAX_WEIGHTS_DIR", str(tmp_path / "cache"))
  monkeypatch.setenv("FGJAX_OFFLINE", "1")
  with pytest.raises(FileNotFoundError) as e:
    models.get("resnet18", pretrained=True)
  msg = str(e.value)
  assert "resnet18-f37072fd.pth" in msg
  assert str(tmp_path / "cache" / "resnet18-f37072fd.pth") in msg
  assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in msg
  assert "weights_path" in msg
  with pytest.raises(FileNotFoundError, match="does not exist"):
    models.get("resnet18", pretrained=True, weights_path=tmp_path / "none.pth")


def test_download_verifies_hash_and_caches(tmp_path, monkeypatch):
  payload = b"not really weights"
  digest = hashlib.sha256(payload).hexdigest()
  src = tmp_path / "src.bin"
  src.write_bytes(payload)
  cache = tmp_path / "cache"
  monkeypatch.setenv("FGJAX_WEIGHTS_DIR", str(cache))
  monkeypatch.delenv("FGJAX_OFFLINE", raising=False)
  good = f"net-{digest[:8]}.pth"
  path = pretrained.fetch_weights(good, src.as_uri())
  assert path == cache / good and path.read_bytes() == payload
  src.unlink()  # Second call is served from the cache.
  assert pretrained.fetch_weights(good, src.as_uri()) == path
  src.write_bytes(payload)
  bad = f"net-{'0' * 8}.pth"
  with pytest.raises(ValueError, match="does not start with 00000000"):
    pretrained.fetch_weights(bad, src.as_uri())
  assert sorted(os.listdir(cache)) == [good]  # Nothing partial left behind.
