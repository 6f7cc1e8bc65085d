"""EDM converter: state dicts, EDM network pickles (read without executing them), errors, the CLI."""
import json
import os
import pickle
import sys
import types

import numpy as np
import pytest

from dmd_jax.families.edm import convert as convert_edm
from dmd_jax.convert.__main__ import main as convert_main
from dmd_jax.convert.common import ConversionError, flatten_params
from fixture_testing import edm_fixture, edm_forward, edm_init_kwargs, edm_state_dict, rel_err

import torch  # the test extra installs it: a missing torch must fail, not skip

NAME = "edm_ddpmpp_cond"


def assert_same_params(a, b):
  fa, fb = flatten_params(a), flatten_params(b)
  assert sorted(fa) == sorted(fb)
  for k in fa:
    np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


# ---------------------------------------------------------------------------------------------------------------
# An EDM network pickle, written the way EDM's training loop writes one.
# ---------------------------------------------------------------------------------------------------------------

MODULE_SRC = "import os\nos.system('echo this source must never run')\n"


@pytest.fixture
def fake_persistence(monkeypatch):
  """A stand-in ``torch_utils.persistence``: persistent classes pickle as
  ``_reconstruct_persistent_obj(meta)`` with the module source, class name and ``__dict__`` in ``meta``."""
  package = types.ModuleType("torch_utils")
  persistence = types.ModuleType("torch_utils.persistence")
  package.persistence = persistence

  def _reconstruct_persistent_obj(meta):
    raise AssertionError("the converter must not reconstruct persistent objects")

  _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
  _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
  persistence._reconstruct_persistent_obj = _reconstruct_persistent_obj
  monkeypatch.setitem(sys.modules, "torch_utils", package)
  monkeypatch.setitem(sys.modules, "torch_utils.persistence", persistence)

  def persistent_class(base, class_name):
    def __reduce__(self):
      fields = list(base.__reduce__(self))
      fields += [None] * max(3 - len(fields), 0)
      meta = dict(type="class", version=6, module_src=MODULE_SRC, class_name=class_name, state=fields[2])
      return (_reconstruct_persistent_obj, (meta,)) + tuple(fields[3:])
    return type(class_name, (base,), {"__reduce__": __reduce__, "__module__": "training.networks"})

  return persistent_class


def build_torch_net(persistent_class, state_dict, init_kwargs):
  """A torch module tree with ``state_dict``'s keys (EDMPrecond → model → ModuleDict enc/dec → blocks → layers)."""
  classes = {}

  def make(class_name, base=torch.nn.Module):
    if class_name not in classes:
      classes[class_name] = persistent_class(base, class_name)
    obj = classes[class_name]()
    return obj

  root = make("EDMPrecond")
  if init_kwargs is not None:
    root._init_args = ()
    root._init_kwargs = dict(init_kwargs)
  for key, value in state_dict.items():
    *path, leaf = key.split(".")
    node = root
    for part in path:
      if part not in node._modules:
        child = torch.nn.ModuleDict() if part in ("enc", "dec") else make(
            "SongUNet" if part == "model" else "UNetBlock" if "block" in part else "Conv2d")
        node.add_module(part, child)
      node = node._modules[part]
    tensor = torch.from_numpy(np.asarray(value))
    if leaf in ("resample_filter", "freqs"):
      node.register_buffer(leaf, tensor)
    else:
      node.register_parameter(leaf, torch.nn.Parameter(tensor, requires_grad=False))
      if leaf == "weight" and "resample_filter" not in node._buffers:
        node.register_buffer("resample_filter", None)  # what EDM's Conv2d holds when it does not resample
  return root.eval()


def write_snapshot(path, net, persistent_class):
  loss_fn = persistent_class(object, "EDMLoss")()
  loss_fn.__dict__.update(P_mean=-1.2, P_std=1.2, sigma_data=0.5)
  augment_pipe = persistent_class(object, "AugmentPipe")()
  augment_pipe.__dict__.update(p=0.12, xflip=1e8, yflip=1, scale=1)
  with open(path, "wb") as f:
    pickle.dump(dict(ema=net, loss_fn=loss_fn, augment_pipe=augment_pipe,
                     dataset_kwargs=dict(class_name="training.dataset.ImageFolderDataset", path="cifar10.zip",
                                         use_labels=True, xflip=False, cache=True)), f)


def test_edm_pickle_to_converted_folder(tmp_path, fake_persistence, monkeypatch):
  state_dict, init_kwargs = edm_state_dict(NAME), edm_init_kwargs(NAME)
  pkl = tmp_path / "edm-fixture.pkl"
  write_snapshot(pkl, build_torch_net(fake_persistence, state_dict, init_kwargs), fake_persistence)
  # Reading must not need (or import) torch_utils: drop the stand-in before loading.
  monkeypatch.delitem(sys.modules, "torch_utils.persistence")
  monkeypatch.delitem(sys.modules, "torch_utils")

  got, got_kwargs = convert_edm.load_edm_pickle(pkl)
  assert list(got) == list(state_dict)  # state_dict() order
  for k, v in state_dict.items():
    np.testing.assert_array_equal(got[k], v.astype(np.float32), err_msg=k)
    assert got[k].dtype == np.float32
  assert got_kwargs == init_kwargs

  module, params = convert_edm.convert_file(pkl, tmp_path / "out")
  config = json.loads((tmp_path / "out" / "config.json").read_text())
  assert config["network"] == "edm" and config["init_kwargs"] == init_kwargs
  module2, params2 = convert_edm.load_converted_edm(tmp_path / "out")
  assert module2 == module
  assert_same_params(params2, edm_fixture(NAME)[1])
  d, _, _ = edm_forward(NAME)(params2)
  err = rel_err(d, edm_fixture(NAME)[3]["D"])
  print(f"\nEDM pickle -> converted folder -> D rel err {err:.2e}")
  assert err <= 1e-5


def test_pickle_without_init_kwargs_is_refused(tmp_path, fake_persistence):
  state_dict = {k: v for k, v in edm_state_dict(NAME).items() if k.startswith("model.map_layer")}
  pkl = tmp_path / "no-kwargs.pkl"
  write_snapshot(pkl, build_torch_net(fake_persistence, state_dict, None), fake_persistence)
  with pytest.raises(ConversionError, match="no init_kwargs"):
    convert_edm.load_edm_pickle(pkl)
  with pytest.raises(ConversionError, match="no init_kwargs"):
    convert_edm.convert_file(pkl, tmp_path / "out")
  assert not (tmp_path / "out").exists()


class _Evil:
  def __init__(self, path):
    self.path = path

  def __reduce__(self):
    return (os.system, (f"touch {self.path}",))


def test_unpickler_refuses_other_globals(tmp_path):
  marker = tmp_path / "pwned"
  pkl = tmp_path / "evil.pkl"
  with open(pkl, "wb") as f:
    pickle.dump(dict(ema=_Evil(marker)), f)
  with pytest.raises(ConversionError, match=r"refusing to load .*system"):
    convert_edm.load_edm_pickle(pkl)
  assert not marker.exists()


# ---------------------------------------------------------------------------------------------------------------
# State dicts and errors.
# ---------------------------------------------------------------------------------------------------------------

def test_npz_and_safetensors_state_dicts(tmp_path):
  state_dict, init_kwargs = edm_state_dict(NAME), edm_init_kwargs(NAME)
  np.savez(tmp_path / "sd.npz", **state_dict)
  from safetensors.numpy import save_file
  save_file({k: np.ascontiguousarray(v) for k, v in state_dict.items()}, str(tmp_path / "sd.safetensors"))
  _, p_npz = convert_edm.convert_file(tmp_path / "sd.npz", tmp_path / "a", init_kwargs)
  _, p_st = convert_edm.convert_file(tmp_path / "sd.safetensors", tmp_path / "b", init_kwargs)
  assert_same_params(p_npz, edm_fixture(NAME)[1])
  assert_same_params(p_st, edm_fixture(NAME)[1])
  _, p_back = convert_edm.load_converted_edm(tmp_path / "a")
  assert_same_params(p_back, p_npz)


def test_ncsnpp_fourier_buffer_is_kept():
  state_dict = edm_state_dict("edm_ncsnpp_uncond")
  _, params = edm_fixture("edm_ncsnpp_uncond")[:2]
  np.testing.assert_array_equal(params["model"]["map_noise"]["freqs"],
                                state_dict["model.map_noise.freqs"].astype(np.float32))


def test_missing_key_is_named():
  state_dict = edm_state_dict(NAME)
  del state_dict["model.enc.8x8_block0.qkv.weight"]
  with pytest.raises(ConversionError, match=r"missing keys \(1\): model\.enc\.8x8_block0\.qkv\.weight"):
    convert_edm.convert_state_dict(state_dict, edm_init_kwargs(NAME))


def test_unexpected_key_is_named():
  state_dict = edm_state_dict(NAME)
  state_dict["model.enc.8x8_block0.extra"] = np.zeros(3, np.float32)
  with pytest.raises(ConversionError, match=r"unexpected keys \(1\): model\.enc\.8x8_block0\.extra"):
    convert_edm.convert_state_dict(state_dict, edm_init_kwargs(NAME))


def test_wrong_shape_is_named():
  state_dict = edm_state_dict(NAME)
  state_dict["model.map_layer1.weight"] = np.zeros((128, 64), np.float32)
  with pytest.raises(ConversionError, match=r"model\.map_layer1\.weight: expected \(128, 128\), got \(128, 64\)"):
    convert_edm.convert_state_dict(state_dict, edm_init_kwargs(NAME))


def test_wrong_init_kwargs_are_named():
  state_dict = edm_state_dict(NAME)
  with pytest.raises(ConversionError, match="not_a_kwarg"):
    convert_edm.convert_state_dict(state_dict, dict(edm_init_kwargs(NAME), not_a_kwarg=1))
  # A config that does not match the weights: every mismatch is reported as a key/shape problem.
  with pytest.raises(ConversionError, match="wrong shapes"):
    convert_edm.convert_state_dict(state_dict, dict(edm_init_kwargs(NAME), model_channels=16))


def test_resample_filter_values_are_checked():
  state_dict = edm_state_dict(NAME)
  state_dict["model.enc.8x8_down.conv0.resample_filter"] = np.full((1, 1, 2, 2), 0.3, np.float32)
  with pytest.raises(ConversionError, match=r"model\.enc\.8x8_down\.conv0\.resample_filter"):
    convert_edm.convert_state_dict(state_dict, edm_init_kwargs(NAME))


def test_unknown_file_type_and_missing_init_kwargs(tmp_path):
  (tmp_path / "weights.ckpt2").write_bytes(b"")
  with pytest.raises(ConversionError, match=r"unknown file type '\.ckpt2'"):
    convert_edm.convert_file(tmp_path / "weights.ckpt2", tmp_path / "out")
  np.savez(tmp_path / "sd.npz", a=np.zeros(1))
  with pytest.raises(ConversionError, match="init_kwargs"):
    convert_edm.convert_file(tmp_path / "sd.npz", tmp_path / "out")
  assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------------------------------------------

def test_cli_npz_plus_json(tmp_path, capsys):
  np.savez(tmp_path / "sd.npz", **edm_state_dict(NAME))
  (tmp_path / "kw.json").write_text(json.dumps(edm_init_kwargs(NAME)))
  rc = convert_main(["edm", f"--src={tmp_path / 'sd.npz'}", f"--dst={tmp_path / 'out'}",
                     f"--init_kwargs={tmp_path / 'kw.json'}"])
  assert rc == 0
  n_params = convert_edm.count_params(edm_fixture(NAME)[1])
  assert f"{n_params:,} parameters" in capsys.readouterr().out
  _, params = convert_edm.load_converted_edm(tmp_path / "out")
  assert_same_params(params, edm_fixture(NAME)[1])
  # Errors come back as a message and exit status 1.
  rc = convert_main(["edm", f"--src={tmp_path / 'sd.bin2'}", f"--dst={tmp_path / 'out2'}"])
  assert rc == 1
  assert "unknown file type" in capsys.readouterr().err
