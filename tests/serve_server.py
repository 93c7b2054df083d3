"""A live `crucible serve` app on a free loopback port, in a thread, for the service and browser tests."""

import contextlib
import io
import json
import socket
import threading
import time
import urllib.error
import urllib.request
import uuid

import uvicorn

from crucible_jax.serve.app import ServeConfig, create_app
from crucible_jax.serve.store import Index


def running(index_dir, config: ServeConfig):
  """Yields the base URL of a server over `index_dir`; stops it on exit."""
  return serving(create_app(Index.open(index_dir), config))


@contextlib.contextmanager
def serving(app):
  """Yields the base URL of a server of the ASGI `app`; stops it on exit."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
  thread = threading.Thread(target=server.run, daemon=True)
  thread.start()
  deadline = time.monotonic() + 30
  while not server.started:
    if time.monotonic() > deadline or not thread.is_alive():
      raise RuntimeError("the test server did not start")
    time.sleep(0.05)
  try:
    yield f"http://127.0.0.1:{port}"
  finally:
    server.should_exit = True
    thread.join(timeout=30)


def request(url: str, data: bytes | None = None, headers: dict | None = None) -> tuple[int, dict, bytes]:
  """(status, headers, body) of a GET (or POST with `data`)."""
  req = urllib.request.Request(url, data=data, headers=headers or {}, method="POST" if data is not None else "GET")
  try:
    with urllib.request.urlopen(req, timeout=120) as response:
      return response.status, dict(response.headers), response.read()
  except urllib.error.HTTPError as e:
    return e.code, dict(e.headers), e.read()


def multipart(fields: dict[str, str | list[str]], files: dict[str, tuple[str, bytes]] = {}) -> tuple[bytes, str]:
  """(body, content type) of a multipart/form-data upload."""
  boundary = uuid.uuid4().hex
  out = io.BytesIO()
  for name, values in fields.items():
    for value in [values] if isinstance(values, str) else values:
      out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
  for name, (filename, data) in files.items():
    out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
              f'Content-Type: application/octet-stream\r\n\r\n'.encode() + data + b"\r\n")
  out.write(f"--{boundary}--\r\n".encode())
  return out.getvalue(), f"multipart/form-data; boundary={boundary}"


def search(base: str, fields: dict, files: dict = {}, token: str | None = None) -> tuple[int, dict]:
  body, kind = multipart(fields, files)
  headers = {"Content-Type": kind, **({"Authorization": f"Bearer {token}"} if token else {})}
  status, _, raw = request(f"{base}/search", body, headers)
  return status, json.loads(raw)
