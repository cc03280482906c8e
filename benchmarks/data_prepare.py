"""Data prepare at scale: bounded memory per task, throughput with workers, identical output.

What it measures, on a generated jsonl corpus of many files (seeded random words, --file-mb MiB per file):

  memory      the peak resident memory (VmHWM) of one tokenize task that tokenizes the whole corpus, in a
              fresh process, on a corpus of --files files and on one 8x larger (8 x --files files of the
              same size). Target: 8x peak <= 1.2 x 1x peak.
  throughput  tokens/s of the tokenize phase (one job array of N tasks through prunectl's launcher,
              `--executor local`: as many tasks at once as the cores hold) on the 8x corpus, with 1 and with 2
              workers. Target: 2 workers >= 1.7 x 1 worker (on a 2-core machine).
  identity    the token files and data.json of the 1- and 2-worker runs are byte-identical.

The tokenizer phase (a BPE on --sample-mb MiB of pretrain text) and finalize run once per run and are timed
apart. Exits 0 unless it crashes: a report, not a test.

    .venv/bin/python benchmarks/data_prepare.py [--files 4] [--file-mb 2] [--sample-mb 2] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO)]

TASK = """
import sys
from pathlib import Path
from prunectl import data
from prunectl.recipe import load_run_recipe
out = Path(sys.argv[1])
data.tokenize_task(load_run_recipe(out).data, out, 0, 1)
print([l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1])  # kB
"""


def corpus(folder: Path, files: int, file_mb: float) -> Path:
    """`files` jsonl files of about file_mb MiB each: documents of 50-600 seeded random words."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(1, 9))) for _ in range(20000)]
    for f in range(files):
        path = folder / f"part-{f:05d}.jsonl"
        if path.exists():
            continue
        rng = random.Random(f)
        lines, size = [], 0
        while size < file_mb * 2**20:
            line = json.dumps({"text": " ".join(rng.choices(words, k=rng.randint(50, 600)))})
            lines.append(line)
            size += len(line) + 1
        path.write_text("\n".join(lines) + "\n")
    return folder


def new_run(root: Path, name: str, source: Path, workers: int, sample_mb: float):
    """A data run directory holding its recipe and manifest, as `prunectl data prepare` makes one."""
    from prunectl import recipe as recipes
    from prunectl import store

    path = root / f"{name}.yaml"
    path.write_text(f"name: {name}\nstage: data\ndata:\n  sources: [{{kind: jsonl, path: '{source}/*.jsonl'}}]\n"
                    f"  tokenizer: {{vocab_size: 4096, sample_chars: {int(sample_mb * 2**20)}}}\n"
                    f"  workers: {workers}\n  choice_task: null\n")
    r = recipes.resolve(str(path))
    run = store.allocate(root / "runs", name)
    recipes.write_run_recipe(run, r)
    run.write_manifest(store.Manifest(name=name, version=run.version, stage="data", executor="local"))
    return run, r


def peak_kb(run_dir: Path) -> int:
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAYON_RS_NUM_CPUS": "1"}
    out = subprocess.run([sys.executable, "-c", TASK, str(run_dir)], env=env, capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


def timed_phases(run, r) -> dict[str, float]:
    """Each phase through prunectl's launcher (local executor), as `data prepare` runs them."""
    from prunectl import launch
    from prunectl.stages import data as data_stage

    res = launch.resources(r.launch)
    seconds = {}
    for name, calls in data_stage.phases(run.dir, r.data.workers):
        start = time.perf_counter()
        jobs = launch.submit("local", res, f"{r.name}-{name}", calls, run.dir / "logs")
        for job in jobs:
            job.result()
        seconds[name] = time.perf_counter() - start
    return seconds


def digest(run_dir: Path) -> str:
    h = hashlib.sha256()
    for p in sorted((run_dir / "tokens").rglob("*.bin")):
        h.update(str(p.relative_to(run_dir)).encode() + p.read_bytes())
    meta = json.loads((run_dir / "data.json").read_text())
    h.update(json.dumps(meta["ranges"], sort_keys=True).encode())
    return h.hexdigest()[:16]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=4, help="files of the 1x corpus (the 8x one has 8 times as many)")
    ap.add_argument("--file-mb", type=float, default=2.0)
    ap.add_argument("--sample-mb", type=float, default=2.0, help="the BPE's training sample")
    ap.add_argument("--workdir", type=Path, default=None, help="keep the corpora here (default: a temporary dir)")
    args = ap.parse_args()
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    from prunectl import data

    root = args.workdir or Path(tempfile.mkdtemp(prefix="prunectl-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    small = corpus(root / "corpus-1x", args.files, args.file_mb)
    large = corpus(root / "corpus-8x", 8 * args.files, args.file_mb)
    print(f"corpora in {root}: 1x {args.files} files, 8x {8 * args.files} files, {args.file_mb} MiB each; "
          f"{os.cpu_count()} cores")

    peaks = {}
    for label, source in (("1x", small), ("8x", large)):
        run, r = new_run(root, f"mem-{label}", source, 1, args.sample_mb)
        data.write_tokenizer(r.data, run.dir)
        peaks[label] = peak_kb(run.dir) / 1024
        print(f"memory {label}: peak RSS of one tokenize task {peaks[label]:.1f} MiB")

    results, digests = {}, {}
    for workers in (1, 2):
        run, r = new_run(root, f"speed-{workers}", large, workers, args.sample_mb)
        seconds = timed_phases(run, r)
        tokens = json.loads((run.dir / "data.json").read_text())["total_tokens"]
        results[workers] = tokens / seconds["tokenize"]
        digests[workers] = digest(run.dir)
        print(f"{workers} worker(s): {tokens:,} tokens; tokenizer {seconds['tokenizer']:.1f} s, tokenize "
              f"{seconds['tokenize']:.1f} s ({results[workers]:,.0f} tokens/s), finalize {seconds['finalize']:.1f} s; "
              f"output {digests[workers]}")

    memory, speed = peaks["8x"] / peaks["1x"], results[2] / results[1]
    print(f"memory ratio 8x/1x: {memory:.3f} (target <= 1.2): {'PASS' if memory <= 1.2 else 'FAIL'}")
    print(f"throughput ratio 2/1 workers: {speed:.3f} (target >= 1.7): {'PASS' if speed >= 1.7 else 'FAIL'}")
    same = digests[1] == digests[2]
    print(f"identical output across worker counts: {same}: {'PASS' if same else 'FAIL'}")


if __name__ == "__main__":
    main()
