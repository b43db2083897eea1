"""What benchmarks/tpu_aot.py compiles for, and how it reports it.

The TPU slices (HBM and peak bf16 FLOP/s per device from the Cloud TPU
documentation), the presets and batches, the jobs they make, the parsing of
collectives from compiled HLO, and the tables: every row, what fits,
README's "Fits on".
"""
import dataclasses
import math
import re

from run_info import commit  # benchmarks/run_info.py

GIB = 2 ** 30
PAPER_BATCH = 4096  # Over 512 v3 cores: 8 per core.


@dataclasses.dataclass(frozen=True)
class Slice:
  """A TPU slice of one generation.

  Attributes:
    topology: jax.experimental.topologies' name, e.g. 'v5e:2x2'.
    hosts: hosts in the slice (4 chips each here).
    cores_per_chip: JAX devices per chip (v3: 2 TensorCores, one device each;
      v4 and v5p: one megacore device per chip).
    hbm_gib: HBM per JAX device (Cloud TPU documentation).
    peak_tflops: bf16 peak per JAX device (Cloud TPU documentation).
    chip_config: 'megacore' where one JAX device spans a chip's two
      TensorCores (v4; JAX's meshes need one device per chip there).
  """
  topology: str
  hosts: int
  cores_per_chip: int
  hbm_gib: float
  peak_tflops: float
  chip_config: str = "default"

  @property
  def generation(self) -> str:
    return self.topology.split(":")[0]


# Names as Cloud TPU's accelerator types count them (v3, v4, v5p: cores;
# v5e, v6e: chips).
SLICES = {
    "v3-8": Slice("v3:2x2", 1, 2, 16.0, 61.5),
    "v4-8": Slice("v4:2x2x1", 1, 1, 32.0, 275.0, "megacore"),
    "v5e-4": Slice("v5e:2x2", 1, 1, 16.0, 197.0),
    "v5p-8": Slice("v5p:2x2x1", 1, 1, 95.0, 459.0),
    "v6e-4": Slice("v6e:2x2", 1, 1, 32.0, 918.0),
    "v3-16": Slice("v3:4x2", 2, 2, 16.0, 61.5),
    "v4-16": Slice("v4:2x2x2", 2, 1, 32.0, 275.0, "megacore"),
    "v5e-8": Slice("v5e:2x4", 2, 1, 16.0, 197.0),
    "v5p-16": Slice("v5p:2x2x2", 2, 1, 95.0, 459.0),
    "v6e-8": Slice("v6e:2x4", 2, 1, 32.0, 918.0),
}
# Per-device batches of the two train-step compiles, by generation; v3's
# first is the paper's (4096 over 512 cores).
BATCHES = {"v3": (8, 16), "v4": (32, 64), "v5e": (32, 64), "v5p": (64, 128),
           "v6e": (32, 64)}
# (config file, its argument, overrides): the pretraining presets.
PRESETS = {
    "byol_r50": ("byol_r50", None, {}),
    "simsiam_r50": ("simsiam_r50", None, {}),
    "simclr_r50": ("simclr_r50", None, {}),
    "byol_r50x2": ("byol_r50", None, {"model.width": 2}),
    "byol_r101": ("byol_r50", None, {"model.depth": 101}),
    "byol_r200x2": ("byol_r50", None, {"model.depth": 200,
                                        "model.width": 2}),
}
PROGRAMS = ("train_step", "finish", "knn_monitor", "linear_step")
NOTE = (
    "Compiled on a CPU machine for TPU topologies described by "
    "jax.experimental.topologies; per-device figures from XLA's memory and "
    "cost analyses; HBM and peak bf16 FLOP/s from the Cloud TPU "
    "documentation. 'largest_batch_per_chip' is read off the line through the"
    " two largest compiled batches ('line_batches', per device; an "
    "extrapolation, never below a compiled batch that fits): XLA "
    "rematerializes at large batches (byol_r50 on v3-8: 14.2 GiB at 512 per "
    "core, not the 42 GiB of the line through 8 and 16). Collective counts "
    "are exact; their byte sizes are n/a where 'collective_bytes_valid' is "
    "false (an earlier HLO parser lost the arrays of tuple-shaped "
    "all-reduces; fixed in 8dfa5c3). Rows with 'error' are programs XLA "
    "refused (RESOURCE_EXHAUSTED); 'expected_misfit' rows were compiled with "
    "--expect-misfit as probes of the refusal. 'finish' rows compile the "
    "presets' canvas of 448 px (at canvas 224, v3-8 batch 8: 2.2 GFLOP, 0.012"
    " GiB). Each row's 'libtpu' is the compiler's version; v6e rows come "
    "from libtpu 0.0.52 through TPU_LIBRARY_PATH, since 0.0.42.1 crashes "
    "compiling train steps for v6e, except the kNN monitor's: 0.0.52 "
    "refuses its HLO and 0.0.42.1 compiles it. Compiled on 2 shared CPU "
    "cores under load: compile seconds are wall time under that load.")


# ------------------------------------------------------------------ jobs --
def row_key(r: dict) -> tuple:
  return (r["preset"], r["slice"], r["program"], r.get("per_device_batch"))


def plan(presets, slices, programs, batches=(0, 1),
         batch: int | None = None) -> list[tuple]:
  """(preset, slice, program, per-device batch) jobs, most telling first:
  the BYOL train step everywhere, the monitor and the others after.
  `batches`: which of the generation's two train-step batches (2-host
  slices: the first only); `batch`: this train-step batch instead."""
  jobs = []
  for program in programs:
    for preset in presets:
      for name in slices:
        first = BATCHES[SLICES[name].generation][0]
        if program == "train_step" and batch:
          jobs.append((preset, name, program, batch))
        elif program == "train_step":
          for i, b in enumerate(BATCHES[SLICES[name].generation]):
            if i in batches and (SLICES[name].hosts == 1 or i == 0):
              jobs.append((preset, name, program, b))
        elif SLICES[name].hosts == 1:
          jobs.append((preset, name, program,
                       first if program == "finish" else None))
  return jobs


def misfit_row(preset: str, name: str, program: str, b: int | None,
               error: str, seconds: float) -> dict:
  """The row of a program XLA refused for want of memory."""
  s = SLICES[name]
  return dict(preset=preset, slice=name, topology=s.topology, hosts=s.hosts,
              program=program, per_device_batch=b, fits=False,
              error=error.splitlines()[0][:500], peak_bytes=0, peak_gib=0.0,
              flops=0.0, collectives={}, compile_seconds=round(seconds, 1),
              hbm_bytes=int(s.hbm_gib * GIB), commit=commit())


# --------------------------------------------------------------- analysis --
_COLLECTIVE = re.compile(
    r"\s(all-to-all|all-gather|all-reduce|reduce-scatter|"
    r"collective-permute)(-start)?\(")
_ARRAY = re.compile(r"\b(pred|[subf]\d+|bf16|f8\w*)\[([\d,]*)\]")
_BYTES = {"pred": 1, "bf16": 2}


def _dtype_bytes(dtype: str) -> int:
  if dtype in _BYTES:
    return _BYTES[dtype]
  bits = re.sub(r"\D", "", dtype.split("e")[0]) or "8"
  return max(1, int(bits) // 8)


def collectives(hlo: str) -> list[dict]:
  """{'kind', 'bytes', 'largest'} of every collective in the compiled HLO:
  bytes of its result (of an async -start: its outputs, not its inputs)."""
  found = []
  for line in hlo.splitlines():
    m = _COLLECTIVE.search(line)
    if not m or " = " not in line[:m.start()]:
      continue
    shape = line[:m.start()].split(" = ", 1)[1]
    shape = re.sub(r"/\*.*?\*/", "", shape)  # /*index=5*/ comments.
    arrays = [(_dtype_bytes(d), math.prod(int(x) for x in dims.split(",")
                                          if x))
              for d, dims in _ARRAY.findall(shape)]
    if m.group(2) and m.group(1) != "all-reduce":
      # (inputs, outputs[, context]) of an async start: keep the outputs.
      arrays = arrays[len(arrays) // 2:] if m.group(1) == "all-gather" else (
          arrays[1:2] or arrays)
    found.append(dict(kind=m.group(1), bytes=sum(b * n for b, n in arrays),
                      largest=max((n for _, n in arrays), default=0)))
  return found


def summarize(found: list[dict]) -> dict:
  """{kind: {'count', 'bytes', 'largest_elements'}}."""
  out: dict[str, dict] = {}
  for c in found:
    k = out.setdefault(c["kind"], dict(count=0, bytes=0, largest_elements=0))
    k["count"] += 1
    k["bytes"] += c["bytes"]
    k["largest_elements"] = max(k["largest_elements"], c["largest"])
  return out


def complete(row: dict, s: Slice, devices: int) -> dict:
  """Adds fits / HBM / per-chip throughput bound to an analysed row."""
  hbm = s.hbm_gib * GIB
  row.update(hbm_bytes=int(hbm), devices=devices,
             fits=bool(row["peak_bytes"] <= hbm),
             peak_gib=round(row["peak_bytes"] / GIB, 3))
  b = row.get("per_device_batch")
  if row["program"] == "train_step" and b and row["flops"] > 0:
    per_image = row["flops"] / b
    row["flops_per_image"] = per_image
    row["images_per_sec_per_chip_bound"] = round(
        s.peak_tflops * 1e12 / per_image * s.cores_per_chip, 1)
  return row


def fits_summary(rows: list[dict]) -> list[dict]:
  """Per preset and generation: the largest per-chip batch that fits (on the
  line through the two compiled train-step batches) and the chips the
  paper's batch of 4096 needs at it."""
  out = []
  pairs: dict[tuple, list] = {}
  for r in rows:
    if r["program"] == "train_step" and r["hosts"] == 1:
      pairs.setdefault((r["preset"], r["slice"]), []).append(r)
  for (preset, name), every in sorted(pairs.items()):
    s = SLICES[name]
    refused = min((r["per_device_batch"] * s.cores_per_chip for r in every
                   if not r["peak_bytes"]), default=None)
    rs = sorted((r for r in every if r["peak_bytes"]),  # Compiled ones.
                key=lambda r: r["per_device_batch"])
    if len(rs) < 2:  # One compile: a lower bound where it fits.
      r = rs[0] if rs else None
      out.append(dict(preset=preset, generation=s.generation,
                      fits_batch_per_chip=(r["per_device_batch"]
                                           * s.cores_per_chip
                                           if r and r["fits"] else None),
                      refused_batch_per_chip=refused,
                      largest_batch_per_chip=None,
                      chips_for_paper_batch=None,
                      bound_images_per_sec_per_chip=r and r.get(
                          "images_per_sec_per_chip_bound")))
      continue
    # The two largest compiled batches: XLA rematerializes at large ones,
    # so lines through small batches overestimate the memory per image.
    (b1, m1), (b2, m2) = [(r["per_device_batch"], r["peak_bytes"])
                          for r in rs[-2:]]
    slope = (m2 - m1) / (b2 - b1)
    fixed = m1 - slope * b1
    largest = int((s.hbm_gib * GIB - fixed) // slope) if slope > 0 else 0
    compiled = max((r["per_device_batch"] for r in rs if r["fits"]), default=0)
    per_chip = max(largest, compiled, 0) * s.cores_per_chip
    chips = (2 ** math.ceil(math.log2(max(1, -(-PAPER_BATCH // per_chip))))
             if per_chip else None)
    out.append(dict(preset=preset, generation=s.generation,
                    fits_batch_per_chip=max(
                        (r["per_device_batch"] * s.cores_per_chip
                         for r in rs if r["fits"]), default=None),
                    refused_batch_per_chip=refused,
                    line_batches=[b1, b2],
                    fixed_gib=round(fixed / GIB, 2),
                    gib_per_image=round(slope / GIB, 4),
                    largest_batch_per_chip=per_chip,
                    chips_for_paper_batch=chips,
                    bound_images_per_sec_per_chip=rs[0].get(
                        "images_per_sec_per_chip_bound")))
  return out


def table(rows: list[dict], fits: list[dict]) -> str:
  """Markdown tables of the rows and of what fits."""
  lines = ["| preset | slice | program | batch/device | peak GiB / HBM | "
           "fits | GFLOP/device | collectives (count, MiB) | compile s | "
           "img/s/chip bound |", "|" + " --- |" * 10]
  for r in rows:
    exact = r.get("collective_bytes_valid", True)
    coll = ", ".join(
        f"{k} {v['count']} "
        f"({v['bytes'] / 2 ** 20:.1f})" if exact else f"{k} {v['count']} (n/a)"
        for k, v in sorted(r["collectives"].items())) or "none"
    lines.append(
        f"| {r['preset']} | {r['slice']} | {r['program']} | "
        f"{r.get('per_device_batch') or r.get('eval_batch') or r.get('batch')}"
        f" | {'refused' if r.get('error') else format(r['peak_gib'], '.2f')}"
        f" / {r['hbm_bytes'] / GIB:.0f} | "
        f"{'yes' if r['fits'] else '**NO**'}"
        f"{' (probe)' if r.get('expected_misfit') else ''} | "
        f"{r['flops'] / 1e9:.1f} | "
        f"{coll} | {r['compile_seconds']} | "
        f"{r.get('images_per_sec_per_chip_bound', '')} |")
  lines += ["", "| preset | generation | GiB fixed + GiB/image | largest batch "
            "per chip | refused per chip | chips for batch 4096 | "
            "img/s/chip bound |", "|" + " --- |" * 7]
  for f in fits:
    line = (f"{f['fixed_gib']} + {f['gib_per_image']} (b {f['line_batches'][0]}"
            f", {f['line_batches'][1]})" if "fixed_gib" in f
            else "one compile")
    largest = f["largest_batch_per_chip"] or (
        f"fits {f['fits_batch_per_chip']}" if f["fits_batch_per_chip"]
        else "none compiled fits")
    lines.append(f"| {f['preset']} | {f['generation']} | {line} | {largest}"
                 f" | {f.get('refused_batch_per_chip') or ''}"
                 f" | {f['chips_for_paper_batch'] or 'n/a'} | "
                 f"{f['bound_images_per_sec_per_chip']} |")
  return "\n".join(lines) + "\n"


GENERATIONS = ("v3", "v4", "v5e", "v5p", "v6e")


def fits_on(result: dict) -> str:
  """README's "Fits on" table: per preset and generation, the largest
  per-chip batch that fits and the chips the paper's batch 4096 needs."""
  cells = {(f["preset"], f["generation"]): f for f in result["fits"]}
  lines = ["| preset | " + " | ".join(GENERATIONS) + " |",
           "| --- |" + " --- |" * len(GENERATIONS)]
  for preset in PRESETS:
    row = []
    for g in GENERATIONS:
      f = cells.get((preset, g))
      if f is None:
        row.append("not compiled")
      elif f["largest_batch_per_chip"]:
        row.append(f"{f['largest_batch_per_chip']} / "
                   f"{f['chips_for_paper_batch']} chips")
      elif f["fits_batch_per_chip"]:  # One compile: a lower bound.
        row.append(f">= {f['fits_batch_per_chip']} / <= "
                   f"{PAPER_BATCH // f['fits_batch_per_chip']} chips")
      else:
        row.append("does not fit")
    if any(c != "not compiled" for c in row):
      lines.append(f"| {preset} | " + " | ".join(row) + " |")
  return "\n".join(lines) + "\n"


def compiled(result: dict) -> str:
  """README's table of what was compiled: per preset and program, per
  generation, the per-device batches on a 1-host slice (train step), 'yes'
  for the other programs, and '2 hosts: b' for rows of 2-host slices."""
  cells: dict[tuple, dict] = {}
  for r in result["rows"]:
    if not r.get("peak_bytes"):
      continue  # Refused rows: the .md table and README's prose.
    key = (r["preset"], r["program"], SLICES[r["slice"]].generation)
    b = r["per_device_batch"] if r["program"] == "train_step" else None
    cells.setdefault(key, {}).setdefault(r["hosts"], set()).add(b)
  lines = ["| preset | program | " + " | ".join(GENERATIONS) + " |",
           "| --- | --- |" + " --- |" * len(GENERATIONS)]
  for preset in PRESETS:
    for program in PROGRAMS:
      row = []
      for g in GENERATIONS:
        parts = []
        for hosts, batches in sorted(cells.get((preset, program, g),
                                               {}).items()):
          text = ", ".join(str(b) for b in sorted(x for x in batches if x))
          text = text or "yes"
          parts.append(text if hosts == 1 else f"{hosts} hosts: {text}")
        row.append("; ".join(parts) or "-")
      if any(c != "-" for c in row):
        lines.append(f"| {preset} | {program} | " + " | ".join(row) + " |")
  return "\n".join(lines) + "\n"
