"""COCO-FID image preparation (center crop, Lanczos 256, clean-fid's resize to 299) against direct PIL calls,
and the 'clean' FID protocol."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from dmd_jax.evaluation import coco_fid, fid

SIZES = [(300, 400), (401, 300), (256, 256), (100, 120), (333, 500), (512, 512), (403, 300)]


def _image(h, w, seed=0):
  r = np.random.RandomState(seed)
  a = r.randint(0, 256, size=(h, w, 3)).astype(np.uint8)
  a[: h // 2, : w // 3] = 255   # sharp edges: bicubic overshoots them
  a[h // 2:, w // 3: w // 2] = 0
  return a


def _torchvision_center_crop(img):
  """torchvision.transforms.functional.center_crop(img, min(img.size)) for a PIL image, written out."""
  w, h = img.size
  s = min(w, h)
  top, left = int(round((h - s) / 2.0)), int(round((w - s) / 2.0))
  return img.crop((left, top, left + s, top + s))


def test_center_crop_box_rounds_like_torchvision():
  assert coco_fid.center_crop_box(400, 300) == (50, 0, 350, 300)
  assert coco_fid.center_crop_box(401, 300) == (50, 0, 350, 300)    # round(50.5) = 50 (half to even)
  assert coco_fid.center_crop_box(403, 300) == (52, 0, 352, 300)    # round(51.5) = 52
  assert coco_fid.center_crop_box(300, 333) == (0, 16, 300, 316)


@pytest.mark.parametrize("h,w", SIZES)
def test_center_crop_resize_matches_pil(h, w):
  a = _image(h, w)
  want = np.asarray(_torchvision_center_crop(Image.fromarray(a)).resize((256, 256), Image.LANCZOS))
  got = coco_fid.center_crop_resize(a)
  assert got.dtype == np.uint8 and got.shape == (256, 256, 3)
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(coco_fid.center_crop_resize(Image.fromarray(a)), want)


@pytest.mark.parametrize("h,w", [(256, 256), (32, 32), (300, 400)])
def test_clean_resize_matches_pil_float_mode(h, w):
  a = _image(h, w, seed=1)
  chans, overshoot = [], False
  for c in range(3):
    im = Image.fromarray(a[:, :, c].astype(np.float32), mode="F").resize((299, 299), Image.BICUBIC)
    raw = np.asarray(im)
    overshoot |= bool(raw.min() < 0 or raw.max() > 255)
    chans.append(raw.clip(0, 255))
  want = np.stack(chans, axis=-1)
  got = coco_fid.clean_resize(a)
  assert got.dtype == np.float32 and got.shape == (299, 299, 3)
  np.testing.assert_array_equal(got, want)
  assert overshoot and got.min() >= 0 and got.max() <= 255   # the clip matters on these edges


def test_prepare_images_shapes_and_errors():
  ims = [_image(300, 400), Image.fromarray(_image(256, 256)), _image(64, 64)[..., :1]]
  x = coco_fid.prepare_images(ims)
  assert x.shape == (3, 299, 299, 3) and x.dtype == np.float32
  np.testing.assert_array_equal(x[0], coco_fid.clean_resize(coco_fid.center_crop_resize(ims[0])))
  gray = np.repeat(_image(64, 64)[..., :1], 3, axis=-1)
  np.testing.assert_array_equal(x[2], coco_fid.clean_resize(coco_fid.center_crop_resize(gray)))
  assert coco_fid.prepare_images([]).shape == (0, 299, 299, 3)
  with pytest.raises(ValueError, match="uint8"):
    coco_fid.center_crop_resize(np.zeros((8, 8, 3), np.float32))


class _PoolFeatures(nn.Module):
  """A stand-in for Inception: channel means of the input through a dense layer (2048 features)."""

  @nn.compact
  def __call__(self, x):
    return nn.Dense(fid.FEATURE_DIM)(jnp.concatenate([x.mean((1, 2)), x.std((1, 2))], axis=-1))


def test_clean_protocol_feeds_prepared_pixels_without_resize():
  module = _PoolFeatures()
  params = module.init(jax.random.PRNGKey(0), jnp.zeros((1, 299, 299, 3)))["params"]
  ims = [_image(h, w, seed=i) for i, (h, w) in enumerate(SIZES[:3])]
  feats = coco_fid.clean_fid_features(module, params, ims, batch_size=2, chunk=2)
  x = coco_fid.prepare_images(ims)
  xn = (x.astype(np.float64) - 128.0) / 128.0   # the stand-in network in float64 on the same pixels
  k, b = (np.asarray(params["Dense_0"][n], np.float64) for n in ("kernel", "bias"))
  want = np.concatenate([xn.mean((1, 2)), xn.std((1, 2))], axis=-1) @ k + b
  assert feats.shape == (3, fid.FEATURE_DIM) and feats.dtype == np.float32
  np.testing.assert_allclose(feats, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(fid.preprocess(x, "clean")), (x - 128.0) / 128.0)
  with pytest.raises(ValueError, match="clean"):
    fid.preprocess(np.zeros((1, 64, 64, 3), np.float32), "clean")
  with pytest.raises(ValueError, match="clean"):
    fid.inception_features(module, params, np.zeros((1, 299, 299, 3), np.uint8), protocol="clean")
