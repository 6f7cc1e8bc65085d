"""dmd_jax.writers: what the TensorBoard event files and the log hold, the fan-out, and the interface (clu's)."""
import ast
import importlib.util
import json
import logging as std_logging
import os
import struct
from unittest import mock

import numpy as np
import pytest

from dmd_jax import writers


def _events(folder) -> list:
  """Every event of the event files in ``folder`` (in name order), each record's checksums verified."""
  from tensorboardX.proto import event_pb2
  from tensorboardX.record_writer import masked_crc32c
  events = []
  for name in sorted(n for n in os.listdir(folder) if "tfevents" in n):
    with open(os.path.join(folder, name), "rb") as f:
      data = f.read()
    i = 0
    while i < len(data):
      (n,) = struct.unpack("Q", data[i:i + 8])
      assert struct.unpack("I", data[i + 8:i + 12])[0] == masked_crc32c(data[i:i + 8])
      record = data[i + 12:i + 12 + n]
      assert struct.unpack("I", data[i + 12 + n:i + 16 + n])[0] == masked_crc32c(record)
      events.append(event_pb2.Event.FromString(record))
      i += 16 + n
  return events


def test_the_event_file_holds_the_scalars_and_the_log_every_write(tmp_path, caplog):
  w = writers.create_writer(str(tmp_path), is_main=True)
  with caplog.at_level(std_logging.INFO, logger="absl"):
    for step in range(5):
      w.write_scalars(step, {"loss": 0.5 * step, "lr": 1e-3, "n": step})
    w.write_texts(5, {"note": "hello"})
    w.write_hparams({"batch_size": 8, "lr": 1e-3})
    w.write_histograms(5, {"w": np.arange(10.0)}, {"w": 2})
    w.write_images(5, {"img": np.zeros((2, 4, 4, 3), np.uint8)})
    w.flush()                                     # waits for tensorboardX's writer thread
    events = _events(tmp_path)
    w.close()
  assert events[0].file_version == "brain.Event:2"
  scalars = [(e.step, v.tag, v.simple_value) for e in events for v in e.summary.value if v.HasField("simple_value")]
  expected = [(s, k, pytest.approx(v)) for s in range(5) for k, v in (("loss", 0.5 * s), ("lr", 1e-3), ("n", s))]
  assert scalars == expected
  tags = {v.tag for e in events for v in e.summary.value}
  assert {"note/text_summary", "hparams/text_summary", "w", "img"} <= tags, tags
  log = [r.getMessage() for r in caplog.records]
  assert "[3] loss=1.5, lr=0.001, n=3" in log                      # sorted by name; floats as %.6g
  assert "[5] Got texts: {'note': 'hello'}." in log
  assert "[Hyperparameters] {'batch_size': 8, 'lr': 0.001}" in log
  assert "[5] Histogram for 'w' = {[0, 4.5): 5, [4.5, 9]: 5}" in log
  assert "[5] Got images: {'img': (2, 4, 4, 3)}." in log


def test_other_processes_only_log(tmp_path, caplog):
  w = writers.create_writer(str(tmp_path), is_main=False)
  with caplog.at_level(std_logging.INFO, logger="absl"):
    w.write_scalars(7, {"loss": 0.25})
    w.flush()
    w.close()
  assert os.listdir(tmp_path) == []
  assert "[7] loss=0.25" in [r.getMessage() for r in caplog.records]


def test_multi_writer_passes_every_call_to_each_writer():
  a, b = (mock.create_autospec(writers.MetricWriter, instance=True) for _ in range(2))
  m = writers.MultiWriter([a, b])
  audio, hist = np.zeros((1, 4, 1)), np.ones(3)
  m.write_scalars(1, {"x": 1.0})
  m.write_audios(2, {"y": audio}, sample_rate=16000)
  m.write_histograms(3, {"z": hist}, {"z": 4})
  m.write_hparams({"h": 1})
  m.flush()
  m.close()
  expected = [mock.call.write_scalars(1, {"x": 1.0}), mock.call.write_audios(2, {"y": audio}, sample_rate=16000),
              mock.call.write_histograms(3, {"z": hist}, {"z": 4}), mock.call.write_hparams({"h": 1}),
              mock.call.flush(), mock.call.close()]
  assert a.mock_calls == expected and b.mock_calls == expected


def _abstract_methods(source: str, cls: str) -> dict:
  """``name -> argument names`` of the abstract methods of class ``cls`` in ``source``."""
  (node,) = [n for n in ast.parse(source).body if isinstance(n, ast.ClassDef) and n.name == cls]
  return {f.name: [a.arg for a in f.args.args + f.args.kwonlyargs] for f in node.body
          if isinstance(f, ast.FunctionDef) and any(getattr(d, "attr", None) == "abstractmethod"
                                                    for d in f.decorator_list)}


def test_the_interface_is_clus():
  """The same abstract methods and arguments as clu's ``MetricWriter``: read from clu's source where clu is installed
  (importing any clu module runs ``clu.metric_writers``' ``__init__``, which needs TensorFlow), else from the
  record of clu 0.0.12's (tests/fixtures/clu_metric_writer_interface.json)."""
  spec = importlib.util.find_spec("clu")
  if spec is not None:
    with open(os.path.join(os.path.dirname(spec.origin), "metric_writers", "interface.py")) as f:
      clu = _abstract_methods(f.read(), "MetricWriter")
  else:
    with open(os.path.join(os.path.dirname(__file__), "fixtures", "clu_metric_writer_interface.json")) as f:
      clu = json.load(f)["methods"]
  with open(writers.__file__) as f:
    ours = _abstract_methods(f.read(), "MetricWriter")
  assert ours == clu
  assert writers.MetricWriter.__abstractmethods__ == frozenset(clu)
  for cls in (writers.LoggingWriter, writers.MultiWriter, writers.TensorboardXWriter):
    assert not cls.__abstractmethods__, cls
