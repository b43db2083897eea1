"""gcp-storage-emulator as the tests start it (conftest's `gcs_bucket`).

  python tests/gcs_emulator.py start --port=PORT --default-bucket=NAME ...

The emulator's media downloads lack the `x-goog-generation` header that
real GCS sends and that tensorstore reads as the object's generation: without
it Orbax's OCDBT manifest (written conditionally on that generation) fails
with "Malformed StorageGeneration". This adds the header before the server
is built, and runs the emulator's own command line.
"""
import sys

from gcp_storage_emulator.handlers import objects

_download = objects.download


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


objects.download = _download_with_generation
from gcp_storage_emulator import __main__ as emulator  # noqa: E402  pylint: disable=g-import-not-at-top

if __name__ == "__main__":
  emulator.main(sys.argv[1:])
