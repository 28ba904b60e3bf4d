"""How the stages' peak memory and wall time grow with the data: each stage at two sizes, measured in one run.

- stage=prepare on synthesized LAION metadata (the pre-download pass) at N and factor x N rows;
- stage=prepare on synthesized images (img2dataset webdataset shards) at M and factor x M images,
- then stage=encode_latents on each (a random tiny-kl-f4 first stage: the compute does not depend on the weights),
- then stage=train_ldm's held-out evaluation on each: as many steps as one evaluation needs, over a fixed number
  of held-out rows (``TRAIN_EVAL``), so what is measured is the cost of finding and reading them.

Each measured run is ``python pipelines/run.py stage=... cluster=local`` in a process of its own, so that it starts
its own local Ray cluster, every process of which (driver, GCS, raylet, workers, actors) descends from it. A thread
here sums their memory every ``--interval`` seconds and keeps the largest sum: the peak memory of the whole cluster.
It sums PSS (``/proc/<pid>/smaps_rollup``), not RSS: a page shared by several processes (Ray's object store in
/dev/shm, the libraries every worker maps) is then counted once, split between them, not once per process. The
wall time is the subprocess's, start-up included (the same at both sizes). The input comes in files of the same
size at both sizes, ``--files`` of them at the small one: only their number grows, and the small size already
runs as many tasks at once as the cluster allows. Generating the data (stage=synthesize,
the metadata parquet) is setup and not measured.

Targets, for each stage at 10 x the data: peak memory <= 1.3 x that at 1 x (memory follows batch and file sizes,
not the data), and wall time <= 11 x (linear, with some slack; 1.1 x the factor at another --factor).
The last line, for scripts:
``scale: memory ratio <worst stage's> time ratio <worst stage's>``.

    .venv/bin/python benchmarks/scale.py [--metadata-rows 200000] [--images 4000] [--factor 10] [--skip-train]
    .venv/bin/python benchmarks/scale.py --metadata-rows 2000 --images 60 --factor 2 --skip-train   # smoke run
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ldm.synthetic.corpus import laion_metadata_table, plan_rows  # noqa: E402
from pipelines.driver.config import compose as config  # noqa: E402
from pipelines.driver.config import plain  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# At --factor 10: memory <= 1.3x, time <= 11x (linear with 10 % slack); the time target scales with the factor.
TARGET_MEMORY, TIME_SLACK = 1.3, 1.1

# The settings the held-out evaluation is measured with: one evaluation (steps = eval_every) over a fixed number of
# held-out rows, the same at both sizes. stage.held_out_images is how many of prepare's held-out images
# encode_latents encodes for it.
EVAL_EVERY = 4
HELD_OUT_ROWS = 256
ENCODE_HELD_OUT = [f"stage.held_out_images={HELD_OUT_ROWS}"]
TRAIN_EVAL = [f"stage.steps={EVAL_EVERY}", f"stage.eval_every={EVAL_EVERY}", f"stage.validation_images={HELD_OUT_ROWS}"]


# -- the cluster's memory -------------------------------------------------------------------------------------------
def _stat(pid: str) -> tuple[int, int] | None:
    """(parent pid, session id) of a process, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            # The command name may hold spaces and parentheses: the fields that follow start after the last ')'.
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), int(fields[3])


def _pss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:  # gone, or a kernel without smaps_rollup: counted as nothing rather than guessed
        pass
    return 0


def cluster_pids(root: int) -> set[int]:
    """``root`` and every process descending from it, plus any in its session: a process Ray daemonises (whose
    parent exits, so that init adopts it) keeps the session it was started in."""
    parents: dict[int, list[int]] = {}
    session: set[int] = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := _stat(entry)) is not None:
            parents.setdefault(stat[0], []).append(int(entry))
            if stat[1] == root:  # the subprocess leads its own session (start_new_session)
                session.add(int(entry))
    found, todo = {root}, [root]
    while todo:
        for child in parents.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found | session


class PeakMemory(threading.Thread):
    """The largest PSS sum over ``cluster_pids(pid)`` seen while the process runs (MiB), and at most how many
    processes it had."""

    def __init__(self, pid: int, interval: float):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak_mib, self.processes = 0.0, 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            pids = cluster_pids(self.pid)
            self.peak_mib = max(self.peak_mib, sum(_pss_kib(p) for p in pids) / 1024)
            self.processes = max(self.processes, len(pids))
            self.stop.wait(self.interval)


# -- running stages -------------------------------------------------------------------------------------------------
def run_stage(work: Path, label: str, overrides: list[str], interval: float | None = None) -> tuple[float, float]:
    """``python pipelines/run.py <overrides>`` in a new session, its output in ``work/logs/<label>.log``; with
    ``interval``, its cluster's peak memory (MiB) and its wall time (s)."""
    log = work / "logs" / f"{label}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    # Hydra's log folder under --root too, not outputs/ in the repository.
    command = [sys.executable, str(REPO / "pipelines" / "run.py"), *overrides, f"hydra.run.dir={work}/hydra/{label}"]
    with open(log, "w") as out:
        started = time.perf_counter()
        process = subprocess.Popen(
            command,
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
        sampler = PeakMemory(process.pid, interval) if interval else None
        if sampler:
            sampler.start()
        rc = process.wait()
        seconds = time.perf_counter() - started
        if sampler:
            sampler.stop.set()
            sampler.join()
    if rc != 0:
        tail = "".join(open(log).readlines()[-30:])
        raise SystemExit(f"{label} failed (exit {rc}); the end of {log}:\n{tail}")
    if sampler:
        print(f"  {label}: peak {sampler.peak_mib:,.0f} MiB over at most {sampler.processes} processes, {seconds:.1f}s")
        return sampler.peak_mib, seconds
    print(f"  {label} (setup): {seconds:.1f}s")
    return 0.0, seconds


# -- the data -------------------------------------------------------------------------------------------------------
def write_metadata(folder: Path, rows: int, resolution: int, per_file: int) -> None:
    """``rows`` rows of synthesized LAION metadata in files of ``per_file`` rows, as stage=synthesize writes it
    but without rendering any image (which is all that stage could do besides).
    Each file is planned on its own with its own seed: plan_rows holds every row in memory and its duplicate
    draws grow with the square of the rows; the seed is in each row's URL, so no URL repeats across files."""
    cfg = config("stage=synthesize", "data=synthetic_metadata", f"data.resolution={resolution}")
    folder.mkdir(parents=True)
    for part, start in enumerate(range(0, rows, per_file)):
        planned = plan_rows(
            num_samples=min(per_file, rows - start),
            resolution=resolution,
            seed=part,
            bad_rows=plain(cfg.data.bad_rows),
            holdout_fraction=cfg.data.holdout_fraction,
            image_host=cfg.data.image_host,
            rows_per_shard=10_000,
        )
        for row in planned:
            row["SAMPLE_ID"] += start
        pq.write_table(laion_metadata_table(planned), folder / f"part-{part:05d}.parquet")


def fmt_ratio(large: float, small: float) -> str:
    return f"{large / small:.2f}" if small > 0 else "n/a"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--metadata-rows", type=int, default=200_000, help="N: metadata rows at the small size")
    parser.add_argument("--images", type=int, default=4000, help="M: images at the small size")
    parser.add_argument("--factor", type=int, default=10, help="the large size is this many times the small one")
    parser.add_argument("--resolution", type=int, default=64)
    # With 2 files at the small size, 2 tasks run at once where the large size runs as many as the CPUs allow:
    # each task is another Ray worker process (~250 MB), and the ratio would measure concurrency, not data.
    parser.add_argument(
        "--files", type=int, default=20, help="input files at the small size (the same file size at the large)"
    )
    parser.add_argument("--interval", type=float, default=0.25, help="seconds between memory samples")
    parser.add_argument("--skip-train", action="store_true", help="leave out train_ldm's held-out evaluation")
    parser.add_argument("--root", default=None, help="work folder (default: a new temporary one)")
    args = parser.parse_args()
    work = Path(args.root) if args.root else Path(tempfile.mkdtemp(prefix="bench-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    if any(work.iterdir()):  # a stage that finds its complete output skips: nothing would be measured
        raise SystemExit(f"--root {work} is not empty")
    tracking = [f"tracking.uri=sqlite:///{work}/mlruns.db", "tracking.experiment=scale"]

    results: list[tuple[str, list[int], list[tuple[float, float]]]] = []
    meta_sizes = [args.metadata_rows, args.factor * args.metadata_rows]
    image_sizes = [args.images, args.factor * args.images]
    print(f"cores: {os.cpu_count()} | work dir: {work}")

    measured = []
    for n in meta_sizes:
        root = work / f"metadata-{n}"
        started = time.perf_counter()
        write_metadata(root / "input", n, args.resolution, args.metadata_rows // args.files)
        print(f"  metadata {n} rows (setup): {time.perf_counter() - started:.1f}s")
        measured.append(
            run_stage(
                work,
                f"prepare-metadata-{n}",
                [
                    "stage=prepare",
                    "data=synthetic_metadata",
                    "experiment=ci",
                    "cluster=local",
                    *tracking,
                    f"storage.root={root}/store",
                    f"data.input.url={root}/input",
                    f"data.resolution={args.resolution}",
                ],
                args.interval,
            )
        )
    results.append(("prepare (metadata)", meta_sizes, measured))

    # Imported here: torch and diffusers are not needed for the metadata pass.
    from ldm.models.first_stage import build_first_stage
    from ldm.models.presets import first_stage_preset

    first_stage = work / "first_stage"
    build_first_stage(first_stage_preset("tiny-kl-f4"), logvar_bias=-6.0).save_pretrained(first_stage)

    prepared, encoded, evaluated = [], [], []
    for n in image_sizes:
        common = [
            "experiment=ci",
            "cluster=local",
            *tracking,
            f"storage.root={work}/images-{n}/store",
            f"data.num_samples={n}",
            f"data.resolution={args.resolution}",
        ]
        # Shards of the same size at both sizes (only their number grows), and enough of them at the small size
        # for as many tasks at once as the cluster runs at the large one (see --files).
        run_stage(
            work,
            f"synthesize-{n}",
            [
                "stage=synthesize",
                *common,
                f"stage.rows_per_shard={args.images // args.files}",
                "stage.formats=[webdataset]",
            ],
        )
        prepared.append(run_stage(work, f"prepare-images-{n}", ["stage=prepare", *common], args.interval))
        encoded.append(
            run_stage(
                work,
                f"encode_latents-{n}",
                ["stage=encode_latents", *common, f"stage.first_stage={first_stage}", *ENCODE_HELD_OUT],
                args.interval,
            )
        )
        if not args.skip_train:
            evaluated.append(
                run_stage(work, f"train_ldm-{n}", ["stage=train_ldm", *common, *TRAIN_EVAL], args.interval)
            )
    results.append(("prepare (images)", image_sizes, prepared))
    results.append(("encode_latents", image_sizes, encoded))
    if not args.skip_train:
        results.append(("train_ldm (held-out eval)", image_sizes, evaluated))

    header = (
        f"{'stage':<26} {'small':>9} {'large':>9} {'MiB small':>10} {'MiB large':>10} {'s small':>8} "
        f"{'s large':>8} {'mem ratio':>9} {'time ratio':>10}"
    )
    print(f"\n{header}\n{'-' * len(header)}")
    worst_memory = worst_time = 0.0
    for name, (small, large), ((mem_s, sec_s), (mem_l, sec_l)) in results:
        print(
            f"{name:<26} {small:>9,} {large:>9,} {mem_s:>10,.0f} {mem_l:>10,.0f} {sec_s:>8.1f} {sec_l:>8.1f} "
            f"{fmt_ratio(mem_l, mem_s):>9} {fmt_ratio(sec_l, sec_s):>10}"
        )
        worst_memory = max(worst_memory, mem_l / mem_s if mem_s else float("inf"))
        worst_time = max(worst_time, sec_l / sec_s if sec_s else float("inf"))
    print(
        f"targets at {args.factor}x the data: memory ratio <= {TARGET_MEMORY} and "
        f"time ratio <= {TIME_SLACK * args.factor:g} for each stage "
        f"(sizes: metadata rows, images; memory: PSS of the whole Ray cluster, sampled every {args.interval}s)"
    )
    print(f"scale: memory ratio {worst_memory:.2f} time ratio {worst_time:.2f}")


if __name__ == "__main__":
    main()
