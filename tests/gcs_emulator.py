"""gcp-storage-emulator as the tests start it (conftest's `gcs_bucket`).

  python tests/gcs_emulator.py [--tf_proxy=PORT:CERT:KEY] start --port=PORT ...

Two fixes of the emulator, to behave as real GCS does for the clients the
project uses, applied before its server is built:

- media downloads carry `x-goog-generation`, which tensorstore reads as the
  object's generation (without it Orbax's OCDBT manifest, written on the
  condition of that generation, fails with "Malformed StorageGeneration");
- a request body sent with `Transfer-Encoding: chunked` is de-chunked even
  when a `Content-Length` header came too (RFC 9112: the transfer coding
  wins), as TensorFlow's GCS uploads send it;
- objects move within a bucket (`.../o/SRC/moveTo/o/DST`, which gcsfs tries
  first for every rename): the emulator answers 501, and gcsfs retries that
  for about 30 s before it copies and deletes instead.

`--tf_proxy` adds what TensorFlow's own GCS filesystem (hard-wired to
https://www.googleapis.com and https://storage.googleapis.com, used by TFDS
for its record files) needs to reach the emulator: an HTTPS proxy on
localhost:PORT that answers CONNECT with TLS under CERT/KEY (trusted through
CURL_CA_BUNDLE) and forwards each request to the emulator. TensorFlow's curl
uses it through `https_proxy`; conftest's `tf_gcs_env` sets that up.
"""
import http
import http.client
import http.server
import socketserver
import ssl
import sys
import threading

from gcp_storage_emulator import server as emulator_server
from gcp_storage_emulator.handlers import objects

_download = objects.download
_read_raw_data = emulator_server._read_raw_data  # pylint: disable=protected-access


def _download_with_generation(request, response, storage, *args, **kwargs):
  try:
    obj = storage.get_file_obj(request.params["bucket_name"],
                               request.params["object_id"])
  except Exception:  # pylint: disable=broad-except  (404: as the emulator)
    obj = None
  if obj is not None:
    response["x-goog-generation"] = str(obj["generation"])
    response["x-goog-metageneration"] = str(obj.get("metageneration", 1))
  return _download(request, response, storage, *args, **kwargs)


def _read_raw_data_chunked_first(request_handler):
  encoding = request_handler.headers.get("Transfer-Encoding") or ""
  if encoding.lower() == "chunked" and request_handler.headers.get(
      "Content-Length"):
    del request_handler.headers["Content-Length"]
  return _read_raw_data(request_handler)


def _move(request, response, storage, *args, **kwargs):
  """moveTo: a copy within the bucket, then the source deleted."""
  request.params["dest_bucket_name"] = request.params["bucket_name"]
  objects.copy(request, response, storage, *args, **kwargs)
  if response.status == http.HTTPStatus.OK:
    objects.delete(request, response, storage, *args, **kwargs)


objects.download = _download_with_generation
emulator_server._read_raw_data = _read_raw_data_chunked_first  # pylint: disable=protected-access
emulator_server.HANDLERS = tuple(
    (rf"^{prefix}/b/(?P<bucket_name>[-.\w]+)/o/(?P<object_id>.*[^/]+)/moveTo/o/"
     r"(?P<dest_object_id>.*[^/]+)$", {"POST": _move})
    for prefix in ("/storage/v1", "")) + emulator_server.HANDLERS
from gcp_storage_emulator import __main__ as emulator  # noqa: E402  pylint: disable=g-import-not-at-top


def _forwarder(emulator_port: int):
  class Forward(http.server.BaseHTTPRequestHandler):
    """One TLS connection from TensorFlow: its requests, to the emulator."""
    protocol_version = "HTTP/1.1"

    def _forward(self):
      if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
        body = b""
        while True:
          size = int(self.rfile.readline().strip() or b"0", 16)
          if not size:
            self.rfile.readline()
            break
          body += self.rfile.read(size)
          self.rfile.readline()
      else:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
      headers = {k: v for k, v in self.headers.items() if k.lower() not in (
          "host", "connection", "transfer-encoding", "content-length")}
      conn = http.client.HTTPConnection("localhost", emulator_port,
                                        timeout=120)
      conn.request(self.command, self.path, body=body or None,
                   headers=headers)
      reply = conn.getresponse()
      data = reply.read()
      conn.close()
      self.send_response(reply.status)
      for k, v in reply.getheaders():
        if k.lower() not in ("transfer-encoding", "connection",
                             "content-length"):
          self.send_header(k, v)
      self.send_header("Content-Length", str(len(data)))
      self.end_headers()
      if self.command != "HEAD":
        self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = do_PATCH = do_HEAD = _forward

    def log_message(self, *args):
      pass
  return Forward


def _serve_tf_proxy(port: int, cert: str, key: str, emulator_port: int):
  context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
  context.load_cert_chain(cert, key)
  forward = _forwarder(emulator_port)

  class Connect(socketserver.StreamRequestHandler):
    def handle(self):
      line = self.rfile.readline()
      while self.rfile.readline() not in (b"\r\n", b"\n", b""):
        pass
      if not line.startswith(b"CONNECT "):
        self.wfile.write(b"HTTP/1.1 405 Method Not Allowed\r\n\r\n")
        return
      self.wfile.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
      self.wfile.flush()
      tls = context.wrap_socket(self.connection, server_side=True)
      forward(tls, self.client_address, self.server)

  class Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

  Server(("localhost", port), Connect).serve_forever()


def main(argv):
  if argv and argv[0].startswith("--tf_proxy="):
    port, cert, key = argv[0].split("=", 1)[1].split(":")
    emulator_port = int(argv[argv.index("--port") + 1])
    threading.Thread(target=_serve_tf_proxy, daemon=True, args=(
        int(port), cert, key, emulator_port)).start()
    argv = argv[1:]
  emulator.main(argv)


if __name__ == "__main__":
  main(sys.argv[1:])
