r"""Packs an image folder into one .npz of JPEG bytes (the npz data source).

  python benchmarks/pack_images.py /data/cifar10 .data/cifar10.npz

ROOT/<split>/<class>/*.{jpg,jpeg,png} -> for every split: `{split}_jpeg`
(uint8, the files' bytes concatenated, unchanged), `{split}_offsets` (int64
[n+1]: image i is jpeg[off[i]:off[i+1]]), `{split}_labels` (int32 [n], the
index of the class in the sorted union of class folder names over all
splits), and `class_names`: the layout of ../shared/datasets/*.npz, which
`--config.data.source=npz` reads. Full CIFAR-10 as JPEG folders packs to about
55 MB, small enough to travel with the repository to a machine without
network.
"""
import argparse
import os

import numpy as np

EXTENSIONS = (".jpg", ".jpeg", ".png")


def _dirs(path: str) -> list[str]:
  return sorted(e.name for e in os.scandir(path)
                if e.is_dir() and not e.name.startswith("."))


def pack(root: str, out: str) -> dict[str, int]:
  """Writes `out` from ROOT/<split>/<class>/*; returns images per split."""
  splits = _dirs(root)
  if not splits:
    raise SystemExit(f"error: {root} has no split folders; expected "
                     "ROOT/<split>/<class>/*.jpg.")
  classes = sorted({c for s in splits for c in _dirs(os.path.join(root, s))})
  arrays, counts = {"class_names": np.asarray(classes)}, {}
  for split in splits:
    chunks, labels = [], []
    for label, name in enumerate(classes):
      folder = os.path.join(root, split, name)
      if not os.path.isdir(folder):
        continue
      for file in sorted(os.listdir(folder)):
        if file.lower().endswith(EXTENSIONS):
          with open(os.path.join(folder, file), "rb") as f:
            chunks.append(np.frombuffer(f.read(), np.uint8))
          labels.append(label)
    if not chunks:
      continue
    offsets = np.zeros(len(chunks) + 1, np.int64)
    np.cumsum([len(c) for c in chunks], out=offsets[1:])
    arrays[f"{split}_jpeg"] = np.concatenate(chunks)
    arrays[f"{split}_offsets"] = offsets
    arrays[f"{split}_labels"] = np.asarray(labels, np.int32)
    counts[split] = len(chunks)
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, "wb") as f:
    np.savez(f, **arrays)
  return counts


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("root", help="ROOT holding ROOT/<split>/<class>/*.jpg")
  p.add_argument("out", help="the .npz to write")
  args = p.parse_args()
  counts = pack(args.root, args.out)
  print(f"wrote {args.out} ({os.path.getsize(args.out) / 2**20:.1f} MiB): "
        + ", ".join(f"{k} {v}" for k, v in counts.items()))


if __name__ == "__main__":
  main()
