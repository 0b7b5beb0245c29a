"""Sweeps as jobs: the job list, the locks, and the same sweep on a real local Ray cluster,
on submitit's local executor and as two concurrent runs on one run directory.

Every run here is a real ``spillover run`` process on a 4-sub-run sweep of the tiny model
(two methods x two seeds: two shared base evaluations); each must compute every stage once
and write comparisons byte-identical to the sequential run's. Every process is given one
thread (``OMP_NUM_THREADS=1``, as the executors give their jobs), so the floating-point
results cannot differ by thread count.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import yaml

from cli_runner import invoke
from spillover.runs.config import RunConfig
from spillover.runs.locks import EVENTS_FILE, job_record, read_events

ROOT = Path(__file__).resolve().parents[1]
MINI_BBQ = Path(__file__).parent / "fixtures" / "bbq_mini"


def _env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH")) if p)
    return {
        **os.environ,
        "PYTHONPATH": path,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
    }


def _spillover(*args: str | Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "spillover", "run", *map(str, args)],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _finish(proc: subprocess.Popen[str], timeout: float = 600) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return out


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sweep's config: tiny model, method [dpo, ipo] x seed [0, 1], one item per cell."""
    from tiny_models import make_tiny

    folder = tmp_path_factory.mktemp("sweep")
    model = make_tiny(folder / "model")
    study = {
        "name": "tiny-sweep",
        "model": str(model),
        "target": "gender",
        "method": ["dpo", "ipo"],
        "seed": [0, 1],
        "bbq": {"dir": str(MINI_BBQ), "allow_unverified": True},
        "eval": {"per_stratum": 1, "chunk_items": 8},
        "align": {"max_steps": 1, "batch_size": 2},
        "compare": {"bootstrap": 100},
    }
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump(study), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def sequential(sweep: Path) -> Path:
    """The sweep run one sub-run after the other (the reference)."""
    out = sweep.parent / "sequential"
    _finish(_spillover(sweep, "--out", out))
    return out


def _slugs(sweep: Path) -> list[str]:
    return [s.slug for s in RunConfig.load(sweep).sub_runs()]


def _comparisons(run: Path, slugs: Sequence[str]) -> dict[str, bytes]:
    return {s: (run / s / "stats" / "comparison.json").read_bytes() for s in slugs}


def _computed(run: Path) -> Counter[tuple[str, str]]:
    """How many times each (sub-run, stage) was computed, from the run's event log."""
    return Counter((e["sub_run"], e["stage"]) for e in read_events(run) if e["status"] == "done")


def _assert_like_sequential(run: Path, sequential: Path, sweep: Path) -> None:
    slugs = _slugs(sweep)
    assert _comparisons(run, slugs) == _comparisons(sequential, slugs)
    computed = _computed(run)
    assert set(computed.values()) == {1}, computed  # no stage computed twice
    # the two shared base evaluations were computed once each, the other two copied
    assert sum(n for (_, stage), n in computed.items() if stage == "eval-base") == 2
    reused = [e for e in read_events(run) if e["status"] == "reused"]
    assert sorted(e["stage"] for e in reused) == ["eval-base", "eval-base"]
    assert len(computed) == 4 * 6 - 2  # every other stage of every sub-run
    assert (run / "report.html").is_file()


# --------------------------------------------------------------------------- the job list


def test_list_subruns_names_the_jobs_and_their_dependencies(sweep: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = invoke(["run", sweep, "--out", out, "--list-subruns", "--json"])
    assert result.exit_code == 0, result.output
    jobs = json.loads(result.output)
    kinds = [j["kind"] for j in jobs]
    assert kinds == ["base"] * 2 + ["model"] * 4 + ["stats"] * 4 + ["report"]
    assert [j["index"] for j in jobs] == list(range(11))
    by_name = {j["name"]: j for j in jobs}
    slugs = _slugs(sweep)
    # dpo and ipo of one seed share the base evaluation, computed in the first one's folder
    for slug in slugs:
        model = by_name[f"model:{slug}"]
        base = jobs[model["after"][0]]
        assert base["kind"] == "base" and base["name"].endswith(slug[-2:])
        assert model["stages"] == ["prefs", "align", "eval-aligned"] and model["gpu"]
        stats = by_name[f"stats:{slug}"]
        assert stats["after"] == [model["index"]] and not stats["gpu"]
        assert stats["stages"] == ["compare", "report"]
    assert jobs[-1]["after"] == [by_name[f"stats:{s}"]["index"] for s in slugs]
    text = invoke(["run", sweep, "--out", out, "--list-subruns"])
    assert text.output.splitlines()[0].split("\t")[:3] == ["0", f"base:{slugs[0]}", "eval-base"]
    assert not out.exists()  # listing writes nothing


@pytest.mark.parametrize(
    ("forced", "expected"),
    [
        (["eval-base"], {"base": {"eval-base"}, "model": {"prefs"}, "stats": {"compare"}}),
        (["align"], {"base": set(), "model": {"align"}, "stats": {"compare"}}),
        (["report"], {"base": set(), "model": set(), "stats": {"report"}}),
        (["all"], {"base": {"eval-base"}, "model": {"prefs"}, "stats": {"compare"}}),
    ],
    ids=["eval-base", "align", "report", "all"],
)
def test_force_reruns_a_stage_in_the_job_that_owns_it(
    sweep: Path, forced: list[str], expected: dict[str, set[str]]
) -> None:
    """`--force` in a distributed run: each job reruns from the first forced stage it owns,
    so a forced shared base evaluation is computed again once (by its base job)."""
    from spillover.runs.jobs import job_force, job_graph
    from spillover.runs.study import check_force, preflight

    cfg = RunConfig.load(sweep)
    jobs = job_graph(cfg, preflight(cfg))
    for job in jobs:
        got = job_force(cfg, job, check_force(forced))
        assert got == expected.get(job.kind, set()), (job.name, got)


def test_dry_run_shows_the_jobs_resources_and_the_shared_filesystem(
    sweep: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    result = invoke(["run", sweep, "--out", out, "--dry-run", "--executor", "slurm",
                     "--slurm-gpus", "1", "--slurm-time", "2:00:00", "--slurm-partition", "gpu"])  # fmt: skip
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "jobs on Slurm, partition gpu: 11 job(s), 2 of them a base evaluation" in text
    assert "[0] base:" in text and "after: base:" in text
    assert "1 GPU(s), 1 CPU(s), time 2:00:00" in text and "0 GPU(s), 1 CPU(s)" in text
    assert "filesystem every node mounts" in text
    assert not out.exists()


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--executor", "dask"], "`--executor`='dask'; expected one of local, ray, slurm"),
        (["--executor", "ray", "--jobs", "2"], "`--jobs` 2 is for `--executor local`"),
        (["--slurm-time", "soon"], "`--slurm-time`='soon'"),
        (["--subrun", "99"], "`--subrun` '99': no such job"),
        (["--json"], "`--json` goes with `--list-subruns`"),
    ],
    ids=["executor", "jobs", "time", "subrun", "json"],
)
def test_executor_mistakes_are_one_line(
    sweep: Path, tmp_path: Path, args: list[str], needle: str
) -> None:
    out = tmp_path / "run"
    result = invoke(["run", sweep, "--out", out, *args])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert needle in " ".join(result.output.split())
    assert len(result.output.strip().splitlines()) == 1 or "UNVERIFIED" in result.output
    assert not (out / "events.jsonl").exists()


# --------------------------------------------------------------------------- concurrency


def test_two_concurrent_runs_never_compute_a_stage_twice(sweep: Path, sequential: Path) -> None:
    """Two `spillover run` on one run directory at once, one of them as `--jobs 2` (its jobs
    as processes): each stage is computed by one process (the others wait on its lock, then
    find it done), and every run finishes with the sequential run's results."""
    out = sweep.parent / "concurrent"
    first = _spillover(sweep, "--out", out)
    second = _spillover(sweep, "--out", out, "--jobs", "2")
    outputs = _finish(first) + _finish(second)
    _assert_like_sequential(out, sequential, sweep)
    assert len({e["pid"] for e in read_events(out)}) >= 2, "only one process computed"
    assert "skip" in outputs
    logs = sorted((out / ".jobs").glob("*.log"))  # --jobs 2: one log per job
    assert len(logs) == 11 and all(p.stat().st_size > 0 for p in logs)


def test_a_job_that_cannot_see_the_drivers_marker_stops_in_one_line(
    sweep: Path, sequential: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job on a node where the run directory is not the driver's (no marker) refuses."""
    monkeypatch.setenv("SPILLOVER_DRIVER_MARKER", "0123456789abcdef")
    before = (sequential / EVENTS_FILE).read_bytes()
    result = invoke(["run", sequential / "config.yaml", "--out", sequential, "--subrun", "3"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    line = next(x for x in result.output.splitlines() if x.startswith("error:"))
    assert "the run directory is not shared with this node" in line
    assert "driver-0123456789abcdef" in " ".join(result.output.split())
    assert (sequential / EVENTS_FILE).read_bytes() == before


def test_a_slurm_array_task_runs_its_job(
    sweep: Path, sequential: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without `--subrun`, $SLURM_ARRAY_TASK_ID names the job (here a finished one: all skip)."""
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "6")
    result = invoke(["run", sequential / "config.yaml", "--out", sequential])
    assert result.exit_code == 0, result.output
    assert "skip compare" in result.output and "skip evaluate aligned model" in result.output
    record = job_record(sequential, f"stats:{_slugs(sweep)[0]}")
    assert record is not None and record["pid"] == os.getpid()


# --------------------------------------------------------------------------- Ray


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[str]:
    """A real Ray cluster of two nodes on this machine (a head and a worker, one CPU each),
    started with ``ray start --block`` and stopped by ending those two processes."""
    pytest.importorskip("ray")
    ray_bin = Path(sys.executable).with_name("ray")
    port = _free_port()
    address = f"127.0.0.1:{port}"
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must fit
    common = ["--num-cpus", "1", "--disable-usage-stats", "--block"]
    logs = Path(temp) / "start.log"
    with open(logs, "ab") as log:
        head = subprocess.Popen(
            [str(ray_bin), "start", "--head", "--node-ip-address", "127.0.0.1", "--port",
             str(port), "--include-dashboard=false", "--temp-dir", temp, *common],
            env=_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        procs = [head]
        try:
            _wait_for_nodes(ray_bin, address, 1, head)
            worker = subprocess.Popen(
                [str(ray_bin), "start", "--address", address, *common],
                env=_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
            procs.insert(0, worker)
            _wait_for_nodes(ray_bin, address, 2, worker)
            yield address
        finally:
            for proc in procs:  # the worker node first, then the head
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            shutil.rmtree(temp, ignore_errors=True)


def _wait_for_nodes(ray_bin: Path, address: str, n: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"`ray start` exited with {proc.returncode}")
        status = subprocess.run(
            [str(ray_bin), "status", "--address", address],
            env=_env(), capture_output=True, text=True, check=False,
        )  # fmt: skip
        active = status.stdout.split("Pending:")[0] if "Active:" in status.stdout else ""
        if active.count("node_") >= n:
            return
        time.sleep(1)
    pytest.fail(f"the Ray cluster at {address} did not reach {n} node(s)")


@pytest.mark.cluster
def test_ray_sweep_retries_a_killed_task_and_resumes_what_is_missing(
    sweep: Path, sequential: Path, ray_cluster: str
) -> None:
    out = sweep.parent / "ray"
    args = (sweep, "--out", out, "--executor", "ray", "--ray-address", ray_cluster,
            "--max-retries", "2")  # fmt: skip
    proc = _spillover(*args)
    victim = f"model:{_slugs(sweep)[1]}"
    deadline = time.monotonic() + 300
    record = None
    while record is None and time.monotonic() < deadline and proc.poll() is None:
        record = job_record(out, victim)
        time.sleep(0.05)
    assert record is not None, "the job never started"
    os.kill(record["pid"], signal.SIGKILL)  # the Ray worker running the job dies mid-task
    _finish(proc)
    retried = job_record(out, victim)
    assert retried is not None and retried["pid"] != record["pid"]  # Ray ran it again
    _assert_like_sequential(out, sequential, sweep)
    # a sub-run's statistics lost (a crash, a deletion): a rerun computes only them
    first = _slugs(sweep)[0]
    shutil.rmtree(out / first / "stats")
    seen = len(read_events(out))
    _finish(_spillover(*args))
    again = [(e["sub_run"], e["stage"], e["status"]) for e in read_events(out)[seen:]]
    # Reports are left out: the combined report re-renders every sub-run's report after its
    # manifest is complete, so a sweep's rerun renders them again (as a sequential rerun does)
    assert [x for x in again if x[1] != "report"] == [(first, "compare", "done")]
    slugs = _slugs(sweep)
    assert _comparisons(out, slugs) == _comparisons(sequential, slugs)


# --------------------------------------------------------------------------- submitit


@pytest.mark.cluster
def test_submitit_local_sweep_matches_sequential(sweep: Path, sequential: Path) -> None:
    pytest.importorskip("submitit")
    out = sweep.parent / "submitit"
    _finish(_spillover(sweep, "--out", out, "--executor", "slurm", "--slurm-cluster", "local"))
    _assert_like_sequential(out, sequential, sweep)
    assert (out / ".jobs" / "submitit").is_dir()  # submitit's job files and logs


@pytest.mark.cluster
@pytest.mark.skipif(
    os.environ.get("SPILLOVER_TEST_SLURM") != "1",
    reason="needs a running Slurm cluster: `make test-slurm` starts a one-node one "
    "(scripts/slurm-local.sh) and runs this test against it",
)
def test_slurm_cluster_sweep_matches_sequential(sweep: Path, sequential: Path) -> None:
    """The sweep as Slurm jobs through submitit (`afterok` dependencies) on a real cluster."""
    pytest.importorskip("submitit")
    out = sweep.parent / "slurm"
    _finish(
        _spillover(sweep, "--out", out, "--executor", "slurm", "--slurm-time", "20"), timeout=1200
    )
    _assert_like_sequential(out, sequential, sweep)
    scripts = sorted((out / ".jobs" / "submitit").rglob("*_submission.sh"))
    assert any("afterok:" in p.read_text() for p in scripts)  # dependencies went to Slurm


def test_training_keeps_to_the_cores_a_job_was_given(monkeypatch: pytest.MonkeyPatch) -> None:
    """A single training process given a share of the cores (`--jobs N`, a Ray task) keeps to
    it; a multi-process launch splits the cores (torchrun's OMP_NUM_THREADS=1 not taken)."""
    from spillover.align.train import _cpu_threads

    cores = os.cpu_count() or 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert _cpu_threads(1) == 3
    assert _cpu_threads(2) == max(cores // 2, 1)
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert _cpu_threads(1) == cores
