"""A local Cloud Storage emulator for tests: ``gcp-storage-emulator`` (in memory, on 127.0.0.1 and a free port),
extended with the parts of the JSON API that TensorStore (Orbax's arrays) and gcsfs (etils.epath) rely on:

* **preconditions**: ``ifGenerationMatch`` / ``ifGenerationNotMatch`` / ``ifMetagenerationMatch`` /
  ``ifMetagenerationNotMatch`` (and ``ifSourceGenerationMatch`` / ``ifSourceGenerationNotMatch`` on copies) on
  reads, uploads, deletes, copies and moves, answered 412 (or 304 for a read whose ``ifGenerationNotMatch``
  holds) as Cloud Storage does; ``generation=N`` reads / deletes only that generation. The emulator as shipped
  ignores them all, so TensorStore's conditional writes (Orbax's manifests) race.
* **generation headers**: ``x-goog-generation`` / ``x-goog-metageneration`` / ``x-goog-stored-content-length``
  on media downloads (TensorStore reads an object's generation from them: without them its reads fail with
  ``Malformed StorageGeneration``).
* **moveTo**: ``POST .../o/SRC/moveTo/o/DST``, the atomic server-side rename gcsfs tries first (without it,
  gcsfs falls back to copy + delete after about 30 s of retries).
* **list ranges**: ``startOffset`` / ``endOffset`` on object listings (TensorStore's range listings).
* one lock around every request (the emulator's storage is not thread-safe) on a threading HTTP/1.1 server,
  so clients that keep many connections open (TensorStore) are neither refused nor kept waiting for
  ``100 Continue``.

``emulator_env(port)`` is the one place that points every client at the emulator (and nowhere else).
Run ``python tests/gcs_emulator.py [--bucket=NAME]`` to serve one by hand; it prints the variables to export.
"""
from __future__ import annotations

import contextlib
import http.server
import json
import os
import re
import socket
import sys
import threading
import time
import traceback
import urllib.parse
import urllib.request
from functools import partial
from http import HTTPStatus

from gcp_storage_emulator import server as gse
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import buckets as gse_buckets
from gcp_storage_emulator.handlers import objects as gse_objects


def free_port() -> int:
  """A TCP port on 127.0.0.1 that nothing listens on right now."""
  with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def emulator_env(port: int, metadata_port: int | None = None) -> dict[str, str]:
  """The environment variables that point TensorStore, gcsfs (etils.epath), google-cloud-storage and
  google-auth at the emulator on ``127.0.0.1:port``, and keep every credential or metadata-server probe on
  127.0.0.1 too. ``metadata_port``: a closed local port for the GCE metadata server (default: a free port,
  which nothing answers on)."""
  url = f"http://127.0.0.1:{port}"
  metadata = f"127.0.0.1:{metadata_port or free_port()}"
  no_proxy = ",".join(x for x in (os.environ.get("NO_PROXY"), "127.0.0.1", "localhost") if x)
  return {
      # TensorStore's gcs driver (Orbax's array data): send every JSON API request to the emulator ...
      "TENSORSTORE_GCS_HTTP_URL": url,
      # ... with this fixed bearer token, which also skips its whole credential search (well-known files,
      # GOOGLE_APPLICATION_CREDENTIALS, the GCE metadata server).
      "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test",
      # gcsfs (etils.epath's backend: every other workdir file, Orbax's metadata) and google-cloud-storage:
      # the JSON API endpoint.
      "STORAGE_EMULATOR_HOST": url,
      # gcsfs: anonymous access (fsspec reads FSSPEC_<PROTOCOL>_<ARG> into the GCSFileSystem arguments), so
      # it never looks for credentials.
      "FSSPEC_GCS_TOKEN": "anon",
      "FSSPEC_GS_TOKEN": "anon",
      # gcsfs: its default (true) asks the Storage Control API which kind each bucket is (zonal /
      # hierarchical namespace); the emulator has no such API and every lookup waits 60 s for a time-out.
      "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
      # google-auth (and gcsfs' credential search): do not probe the GCE metadata server ...
      "NO_GCE_CHECK": "true",
      # ... and if anything still asks it, the question goes to a closed port on this machine, not to
      # metadata.google.internal / 169.254.169.254 (GCE_METADATA_HOST and GCE_METADATA_IP: google-auth;
      # GCE_METADATA_ROOT: older google-auth and TensorStore).
      "GCE_METADATA_HOST": metadata,
      "GCE_METADATA_IP": metadata,
      "GCE_METADATA_ROOT": metadata,
      # no credentials file, no gcloud configuration from this machine's user
      "GOOGLE_APPLICATION_CREDENTIALS": "",
      "CLOUDSDK_CONFIG": os.path.join(os.sep, "nonexistent-gcloud-config"),
      # the project google-cloud-storage asks for (it would otherwise search for one)
      "GOOGLE_CLOUD_PROJECT": "test-project",
      # a proxy configured on the machine must not see (or forward) the emulator's traffic
      "NO_PROXY": no_proxy,
      "no_proxy": no_proxy,
  }


# ---------------------------------------------------------------------------------------------------------
# The extensions.
# ---------------------------------------------------------------------------------------------------------

def _query_int(request, name):
  v = request.query.get(name)
  return None if not v else int(v[0])


def _live(storage, bucket, name):
  try:
    return storage.get_file_obj(bucket, name)
  except NotFound:
    return None


def _failed(response, status, message):
  response.status = status
  if status != HTTPStatus.NOT_MODIFIED:
    response.json({"error": {"code": int(status), "message": message,
                             "errors": [{"reason": "conditionNotMet" if status == 412 else "notFound",
                                         "message": message}]}})
  return True


def _check_object(request, response, obj, prefix="", read=False) -> bool:
  """Applies the generation / metageneration preconditions named ``<prefix>ifGenerationMatch``, ... to
  ``obj`` (None: no live object); True when the request is answered (412, 304 or 404) here."""
  gen = None if obj is None else int(obj["generation"])
  meta = None if obj is None else int(obj["metageneration"])
  match, not_match = _query_int(request, prefix + "ifGenerationMatch"), _query_int(
      request, prefix + "ifGenerationNotMatch")
  mmatch, mnot = _query_int(request, prefix + "ifMetagenerationMatch"), _query_int(
      request, prefix + "ifMetagenerationNotMatch")
  if read and obj is None:
    return _failed(response, HTTPStatus.NOT_FOUND, "No such object")
  if match is not None and (gen or 0) != match:
    return _failed(response, HTTPStatus.PRECONDITION_FAILED, f"{prefix}ifGenerationMatch={match}: "
                   f"the live generation is {gen}")
  if not_match is not None and gen is not None and gen == not_match:
    return _failed(response, HTTPStatus.NOT_MODIFIED if read else HTTPStatus.PRECONDITION_FAILED,
                   f"{prefix}ifGenerationNotMatch={not_match}")
  if mmatch is not None and meta != mmatch:
    return _failed(response, HTTPStatus.PRECONDITION_FAILED, f"{prefix}ifMetagenerationMatch={mmatch}")
  if mnot is not None and meta is not None and meta == mnot:
    return _failed(response, HTTPStatus.NOT_MODIFIED if read else HTTPStatus.PRECONDITION_FAILED,
                   f"{prefix}ifMetagenerationNotMatch={mnot}")
  return False


def _read(fn, media=False):
  """objects.get / download (``media``): preconditions, ``generation=N``, and the generation headers on
  media downloads."""
  def handler(request, response, storage, *args, **kwargs):
    b, name = request.params["bucket_name"], request.params["object_id"]
    obj = _live(storage, b, name)
    wanted = _query_int(request, "generation")
    if obj is not None and wanted is not None and wanted != int(obj["generation"]):
      obj = None   # no object versioning here: only the live generation exists
    if _check_object(request, response, obj, read=True):
      return
    fn(request, response, storage, *args, **kwargs)
    if response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT) and (
        media or request.query.get("alt") == ["media"]):
      response["x-goog-generation"] = obj["generation"]
      response["x-goog-metageneration"] = obj["metageneration"]
      response["x-goog-stored-content-length"] = str(obj["size"])
      response["x-goog-stored-content-encoding"] = "identity"
  return handler


def _upload(fn):
  """Uploads (media, multipart, resumable: the session URL keeps the query, so its chunks are checked
  too): preconditions on the destination's live object."""
  def handler(request, response, storage, *args, **kwargs):
    b = request.params["bucket_name"]
    name = request.query.get("name", [None])[0]
    if name is None and isinstance(request.data, dict):
      name = (request.data.get("meta") or request.data).get("name")
    if name is not None and _check_object(request, response, _live(storage, b, name)):
      return
    fn(request, response, storage, *args, **kwargs)
  return handler


def _write_to(dest_bucket_key, dest_object_key):
  """delete / patch / copy / rewrite: preconditions on the target (the destination for copies) and
  ``ifSourceGeneration*`` on a copy's source."""
  def wrap(fn):
    def handler(request, response, storage, *args, **kwargs):
      p = request.params
      target = _live(storage, p[dest_bucket_key], p[dest_object_key])
      if fn is gse_objects.delete and target is None:
        return _failed(response, HTTPStatus.NOT_FOUND, "No such object")
      wanted = _query_int(request, "generation")
      if fn is gse_objects.delete and wanted is not None and wanted != int(target["generation"]):
        return _failed(response, HTTPStatus.NOT_FOUND, f"No such object generation {wanted}")
      if _check_object(request, response, target):
        return
      if "dest_object_id" in p:
        src = _live(storage, p["bucket_name"], p["object_id"])
        if src is None:
          return _failed(response, HTTPStatus.NOT_FOUND, "No such source object")
        if _check_object(request, response, src, prefix="ifSource"):
          return
      fn(request, response, storage, *args, **kwargs)
    return handler
  return wrap


def _move(request, response, storage, *args, **kwargs):
  """objects.move: an atomic rename within a bucket (copy and delete under the server's lock), with the
  source (``ifSourceGeneration*``) and destination (``ifGeneration*``) preconditions."""
  p = request.params
  b, src_name, dst_name = p["bucket_name"], p["object_id"], p["dest_object_id"]
  src = _live(storage, b, src_name)
  if src is None:
    return _failed(response, HTTPStatus.NOT_FOUND, f"No such object: {b}/{src_name}")
  if _check_object(request, response, _live(storage, b, dst_name)) or _check_object(
      request, response, src, prefix="ifSource"):
    return
  data = storage.get_file(b, src_name)
  generation = time.time_ns()
  obj = dict(src, name=dst_name, generation=str(generation), metageneration="1",
             id=f"{b}/{dst_name}/{generation}", selfLink=f"/storage/v1/b/{b}/o/{urllib.parse.quote(dst_name)}",
             mediaLink=f"{request.base_url}/download/storage/v1/b/{b}/o/{urllib.parse.quote(dst_name, safe='')}"
                       f"?generation={generation}&alt=media")
  storage.create_file(b, dst_name, data, obj)
  storage.delete_file(b, src_name)
  response.json(obj)


def _ranged_list(request, response, storage, *args, **kwargs):
  """objects.list with ``startOffset`` / ``endOffset`` (names in [start, end))."""
  gse_objects.ls(request, response, storage, *args, **kwargs)
  start, end = request.query.get("startOffset", [None])[0], request.query.get("endOffset", [None])[0]
  if response.status != HTTPStatus.OK or (start is None and end is None):
    return
  out = json.loads(response._content)
  out["items"] = [o for o in out["items"] if (start is None or o["name"] >= start)
                  and (end is None or o["name"] < end)]
  response.json(out)


_WRAP = {
    gse_objects.get: _read(gse_objects.get),
    gse_objects.download: _read(gse_objects.download, media=True),
    gse_objects.insert: _upload(gse_objects.insert),
    gse_objects.upload_partial: _upload(gse_objects.upload_partial),
    gse_objects.delete: _write_to("bucket_name", "object_id")(gse_objects.delete),
    gse_objects.patch: _write_to("bucket_name", "object_id")(gse_objects.patch),
    gse_objects.copy: _write_to("dest_bucket_name", "dest_object_id")(gse_objects.copy),
    gse_objects.rewrite: _write_to("dest_bucket_name", "dest_object_id")(gse_objects.rewrite),
    gse_objects.ls: _ranged_list,
}
_OBJECT = r"(?P<object_id>.*[^/]+)"
_MOVE = (rf"^{gse.settings.API_ENDPOINT}/b/(?P<bucket_name>[-.\w]+)/o/{_OBJECT}/moveTo/o/"
         r"(?P<dest_object_id>.*[^/]+)$", {gse.POST: _move})
HANDLERS = (_MOVE,) + tuple((regex, {m: _WRAP.get(fn, fn) for m, fn in methods.items()})
                            for regex, methods in gse.HANDLERS)


class _Router(gse.Router):
  """The emulator's router over :data:`HANDLERS` (the shipped routes with the extensions above)."""

  def handle(self, method):
    handler = self._request_handler
    method = handler.headers.get("x-http-method-override") or method
    request, response = gse.Request(handler, method), gse.Response(handler)
    storage = handler.storage
    for regex, methods in HANDLERS:
      match = re.fullmatch(regex, request.path)
      if not match:
        continue
      request.set_match(match)
      fn = methods.get(method)
      if fn is None and method == gse.POST and request.query.get("uploadType") and request.path.endswith("/o"):
        fn = _WRAP[gse_objects.insert]
      if fn is None:
        response.status = HTTPStatus.NOT_IMPLEMENTED
        break
      try:
        request.data   # pylint: disable=pointless-statement  (the whole body, read before taking the lock)
        with handler.server.lock:
          fn(request, response, storage)
      except Exception as e:  # pylint: disable=broad-except  (answer 500, as a server would; clients retry)
        traceback.print_exc()
        response = gse.Response(handler)
        response.status = HTTPStatus.INTERNAL_SERVER_ERROR
        response.json({"error": {"code": 500, "message": f"{type(e).__name__}: {e}"}})
      break
    else:
      response.status = HTTPStatus.NOT_IMPLEMENTED
    if request._data is gse._UNSET and (handler.headers.get("Content-Length", "0") != "0"
                                         or handler.headers.get("Transfer-Encoding")):
      handler.close_connection = True   # an unread body would be taken for the next request
      response["Connection"] = "close"
    entry = [method, request.path + ("?" + request._parsed_url.query if request._parsed_url.query else ""),
             int(response.status)]
    handler.server.log.append(entry)
    try:
      response.close()
    except (BrokenPipeError, ConnectionResetError):   # the client hung up (a cancelled or killed reader)
      entry.append("client gone")
      handler.close_connection = True


class _Handler(gse.RequestHandler):
  protocol_version = "HTTP/1.1"   # keep-alive, and an immediate "100 Continue" for curl (TensorStore)

  def _route(self, method):
    _Router(self).handle(method)

  def do_GET(self):
    self._route(gse.GET)

  def do_POST(self):
    self._route(gse.POST)

  def do_PUT(self):
    self._route(gse.PUT)

  def do_DELETE(self):
    self._route(gse.DELETE)

  def do_PATCH(self):
    self._route(gse.PATCH)

  def log_message(self, format, *args):  # pylint: disable=redefined-builtin
    pass


class _Server(http.server.ThreadingHTTPServer):
  daemon_threads = True
  request_queue_size = 128

  def handle_error(self, request, client_address):
    if not isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):   # a client that exits
      super().handle_error(request, client_address)


class Emulator:
  """The extended emulator, in memory, served from a thread of this process: ``with Emulator() as gcs:``
  then ``gcs.env`` for the clients and ``gcs.list(prefix)`` to see what is in the bucket."""

  def __init__(self, bucket: str = "bucket", port: int | None = None):
    self.bucket = bucket
    self.port = port or free_port()
    self.url = f"http://127.0.0.1:{self.port}"
    self.env = emulator_env(self.port)
    self._storage = gse.Storage(use_memory_fs=True)
    gse_buckets.create_bucket(bucket, self._storage)
    self._storage.buckets[bucket]["softDeletePolicy"] = {"retentionDurationSeconds": "0"}   # hard deletes
    self._httpd = self._thread = None

  @property
  def log(self) -> list[list]:
    """``[method, path?query, status(, 'client gone')]`` of every request answered so far."""
    return self._httpd.log

  def start(self) -> "Emulator":
    self._httpd = _Server(("127.0.0.1", self.port), partial(_Handler, self._storage))
    self._httpd.lock, self._httpd.log = threading.Lock(), []
    self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                    name=f"gcs-emulator-{self.port}", daemon=True)
    self._thread.start()
    return self

  def stop(self) -> None:
    if self._httpd is not None:
      self._httpd.shutdown()
      self._httpd.server_close()
      self._thread.join(timeout=10)
      self._httpd = None

  def __enter__(self) -> "Emulator":
    return self.start()

  def __exit__(self, *exc) -> None:
    self.stop()

  def list(self, prefix: str = "") -> list[str]:
    """The names of the objects under ``prefix`` in the bucket, listed through the emulator's JSON API."""
    q = urllib.parse.urlencode({"prefix": prefix})
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
        f"{self.url}/storage/v1/b/{self.bucket}/o?{q}", timeout=30) as r:
      return sorted(o["name"] for o in json.load(r).get("items") or [])

  def read(self, name: str) -> bytes:
    """The contents of object ``name``, downloaded through the emulator's JSON API."""
    quoted = urllib.parse.quote(name, safe="")
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
        f"{self.url}/storage/v1/b/{self.bucket}/o/{quoted}?alt=media", timeout=30) as r:
      return r.read()


if __name__ == "__main__":
  import argparse
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--bucket", default="bucket")
  parser.add_argument("--port", type=int, default=None)
  args = parser.parse_args()
  with Emulator(args.bucket, args.port) as gcs:
    for k, v in gcs.env.items():
      print(f"export {k}={v!r}")
    print(f"# serving gs://{gcs.bucket} at {gcs.url}; Ctrl-C stops", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
      while True:
        time.sleep(1)
