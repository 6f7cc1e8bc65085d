"""CLIP (both towers) vs transformers.CLIPModel, the CLIP converter, CLIP preprocessing vs
CLIPImageProcessor, and the CLIP score. Tiny random models written with save_pretrained; nothing is
downloaded."""
import json
import os

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import sd_testing as st
from dmd_jax.convert import clip as convert_clip
from dmd_jax.convert.common import ConversionError
from dmd_jax.evaluation import clip_score as cs

TEXT = dict(st.CLIP)
VISION = dict(hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
              image_size=224, patch_size=32, hidden_act="gelu")
PROJ = 16


def torch_clip_model(seed=3):
  import torch
  from transformers import CLIPConfig, CLIPModel
  torch.manual_seed(seed)
  cfg = CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=PROJ)
  return st.perturb_(CLIPModel(cfg), seed)


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("clip"))
  model = torch_clip_model()
  model.save_pretrained(folder)
  st.write_tokenizer_files(folder)
  with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
    json.dump({"model_max_length": TEXT["max_position_embeddings"], "tokenizer_class": "CLIPTokenizer"}, f)
  return folder, model


@pytest.fixture(scope="module")
def converted(clip_folder):
  folder, _ = clip_folder
  return convert_clip.convert_clip_model(folder)


def _ids(batch, length, seed=0):
  r = np.random.RandomState(seed)
  ids = r.randint(0, 62, size=(batch, length))
  ids[:, 0] = 62
  for i in range(batch):  # end-of-text at different positions, padding after it
    e = 3 + i % (length - 3)
    ids[i, e:] = 63
  return ids.astype(np.int64)


def test_features_match_transformers(clip_folder, converted):
  import torch
  _, model = clip_folder
  module, params, _ = converted
  r = np.random.RandomState(1)
  pixels = r.randn(3, 3, 224, 224).astype(np.float32)
  ids = _ids(3, 12)
  with torch.no_grad():
    ref_img = model.get_image_features(pixel_values=torch.from_numpy(pixels)).pooler_output.numpy()
    ref_txt = model.get_text_features(input_ids=torch.from_numpy(ids)).pooler_output.numpy()
    ref_logits = model(input_ids=torch.from_numpy(ids), pixel_values=torch.from_numpy(pixels)).logits_per_image
  nhwc = jnp.asarray(pixels.transpose(0, 2, 3, 1))
  img = module.apply({"params": params}, nhwc, method="get_image_features")
  txt = module.apply({"params": params}, jnp.asarray(ids), method="get_text_features")
  _, _, logits = module.apply({"params": params}, jnp.asarray(ids), nhwc)
  e_img, e_txt = st.rel_err(img, ref_img), st.rel_err(txt, ref_txt)
  e_log = st.rel_err(logits, ref_logits.numpy())
  print(f"CLIP parity: image features {e_img:.2e}, text features {e_txt:.2e}, logits {e_log:.2e}")
  assert img.shape == (3, PROJ) and txt.shape == (3, PROJ) and img.dtype == jnp.float32
  assert e_img <= 1e-5 and e_txt <= 1e-5 and e_log <= 1e-5


def _numpy_state_dict(model):
  return {k: v.numpy() for k, v in model.state_dict().items()}


def test_converter_errors_name_the_problem(clip_folder):
  folder, model = clip_folder
  with open(os.path.join(folder, "config.json")) as f:
    config = json.load(f)
  sd = _numpy_state_dict(model)
  convert_clip.convert_state_dict(dict(sd, **{"vision_model.embeddings.position_ids": np.zeros((1, 50))}),
                                  config)  # an old buffer is ignored
  missing = {k: v for k, v in sd.items() if k != "vision_model.encoder.layers.1.mlp.fc2.bias"}
  with pytest.raises(ConversionError, match=r"missing keys \(1\): vision_model\.encoder\.layers\.1\.mlp\.fc2\.bias"):
    convert_clip.convert_state_dict(missing, config)
  bad = dict(sd, **{"visual_projection.weight": np.zeros((PROJ + 1, 32), np.float32)})
  with pytest.raises(ConversionError, match=r"wrong shapes \(1\): visual_projection\.weight: expected "
                                            r"\(16, 32\), got \(17, 32\)"):
    convert_clip.convert_state_dict(bad, config)
  with pytest.raises(ConversionError, match="unexpected keys.*text_model.extra"):
    convert_clip.convert_state_dict(dict(sd, **{"text_model.extra": np.zeros(1)}), config)
  with pytest.raises(ConversionError, match="hidden_act"):
    convert_clip.convert_state_dict(sd, dict(config, vision_config=dict(config["vision_config"],
                                                                        hidden_act="relu6")))
  with pytest.raises(ConversionError, match="model_type"):
    convert_clip.build_clip({"model_type": "siglip"})


def test_converter_folder_errors(tmp_path, clip_folder):
  folder, _ = clip_folder
  with pytest.raises(ConversionError, match="no such folder"):
    convert_clip.convert_clip_model(str(tmp_path / "nope"))
  (tmp_path / "a").mkdir()
  with pytest.raises(ConversionError, match="missing config"):
    convert_clip.convert_clip_model(str(tmp_path / "a"))
  (tmp_path / "a" / "config.json").write_text(open(os.path.join(folder, "config.json")).read())
  with pytest.raises(ConversionError, match="tokenizer"):
    convert_clip.convert_clip_model(str(tmp_path / "a"))
  with pytest.raises(ConversionError, match="no weights"):
    convert_clip.convert_clip_model(str(tmp_path / "a"), tokenizer_dir=folder)


def test_command_line_roundtrip(tmp_path, clip_folder, converted):
  from dmd_jax.convert.__main__ import main
  folder, _ = clip_folder
  dst = str(tmp_path / "out")
  assert main(["clip", f"--src={folder}", f"--dst={dst}"]) == 0
  module, params, tok = convert_clip.load_converted_clip(dst)
  assert module.config == converted[0].config
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(converted[1])):
    np.testing.assert_array_equal(a, b)
  assert tok("red bus")["input_ids"] == converted[2]("red bus")["input_ids"]
  assert main(["clip", f"--src={tmp_path / 'nope'}", f"--dst={dst}"]) == 1


def _pil_images():
  from PIL import Image
  r = np.random.RandomState(4)
  sizes = [(300, 400), (400, 300), (224, 224), (512, 512), (231, 500), (500, 233), (100, 150), (257, 256)]
  ims = [Image.fromarray(r.randint(0, 256, size=(h, w, 3)).astype(np.uint8)) for h, w in sizes]
  ims.append(Image.fromarray(r.randint(0, 256, size=(240, 320)).astype(np.uint8), "L"))
  return ims


def test_preprocessing_matches_clip_image_processor():
  from transformers import CLIPImageProcessorPil
  proc = CLIPImageProcessorPil()
  worst = 0.0
  for im in _pil_images():
    ref = proc(images=[im], return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    ours = np.asarray(cs.normalize(cs.preprocess_images([im])))[0]
    assert ours.shape == ref.shape == (224, 224, 3)
    worst = max(worst, float(np.abs(ours - ref).max()))
  print(f"CLIP preprocessing vs CLIPImageProcessor: max abs diff {worst:.2e}")
  assert worst == 0.0   # bit-identical
  # uint8 arrays and PIL images give the same pixels
  im = _pil_images()[0]
  np.testing.assert_array_equal(cs.preprocess_images([im]), cs.preprocess_images(np.asarray(im)[None]))
  with pytest.raises(ValueError, match="uint8"):
    cs.preprocess_images(np.zeros((1, 8, 8, 3), np.float32))


def test_shortest_side_size():
  assert cs.shortest_side_size(300, 400) == (224, 298)
  assert cs.shortest_side_size(400, 300) == (298, 224)
  assert cs.shortest_side_size(512, 512) == (224, 224)


def test_score_toy_and_against_transformers(clip_folder, converted):
  import torch
  # 100 * max(cos, 0): identical, orthogonal-ish, opposite directions
  s = np.asarray(cs.per_sample_score(np.array([[1.0, 0], [1, 0], [2, 0]]), np.array([[3.0, 0], [1, 1], [-1, 0]])))
  np.testing.assert_allclose(s, [100.0, 100.0 / np.sqrt(2.0), 0.0], rtol=1e-6)

  _, model = clip_folder
  module, params, tok = converted
  ims = _pil_images()[:5]
  caps = ["red bus", "a bus", "red", "bus bus", "abc"]
  ids = cs.tokenize(tok, caps)
  assert ids.shape == (5, TEXT["max_position_embeddings"]) and ids.dtype == np.int32
  assert tok.decode(ids[2], skip_special_tokens=True).replace(" ", "") == "aphotodepictsred"
  assert ids[0, -1] == 63   # 16 tokens: "a photo depicts red bus" is truncated, the end token kept
  scores = cs.clip_scores(module, params, tok, ims, caps, batch_size=2)   # 3 batches, last one padded
  from transformers import CLIPImageProcessorPil
  pix = CLIPImageProcessorPil()(images=ims, return_tensors="pt")["pixel_values"]
  with torch.no_grad():
    fi = model.get_image_features(pixel_values=pix).pooler_output
    ft = model.get_text_features(input_ids=torch.from_numpy(ids.astype(np.int64))).pooler_output
  cos = torch.nn.functional.cosine_similarity(fi, ft, dim=-1).numpy()
  ref = 100.0 * np.maximum(cos, 0.0)
  print(f"CLIP scores {np.round(scores, 3)} vs transformers {np.round(ref, 3)}")
  np.testing.assert_allclose(scores, ref, atol=1e-3)
  mean = cs.clip_score(module, params, tok, ims, caps, batch_size=4)
  np.testing.assert_allclose(mean, ref.mean(), atol=1e-3)
  np.testing.assert_allclose(cs.image_features(module, params, ims, batch_size=4), fi.numpy(), rtol=1e-4,
                             atol=1e-5)
  np.testing.assert_allclose(cs.text_features(module, params, tok, caps), ft.numpy(), rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match="captions"):
    cs.clip_scores(module, params, tok, ims, caps[:2])
