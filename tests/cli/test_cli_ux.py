"""The CLI helps: report, ls, inspect of a root, --version, -v anywhere, "did you mean", clean
help, quiet pipes and Ctrl-C, no library log noise, errors that say what to set."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from _net import serve
from test_cli import _job, kdcache

from kdcache.core.cachestats import cache_stats
from kdcache.core.reader import CacheReader
from kdcache.service import Settings, create_app

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def root(
    tmp_path_factory: pytest.TempPathFactory, tiny_teacher_dir: Path, tokens_npy: Path
) -> Path:
    """A storage root with one complete cache (8 rows, 3 shards) and one missing a shard."""
    tmp = tmp_path_factory.mktemp("ux")
    root = tmp / "root"
    res = kdcache("run", str(_job(tmp, tiny_teacher_dir, tokens_npy)), "--root", str(root))
    assert res.returncode == 0, res.stderr
    done = Path(res.stdout.strip().splitlines()[-1])
    partial = root / "caches" / ("f" * 32)
    shutil.copytree(done, partial)
    (partial / "_kdcache" / "shards" / "00000001.json").unlink()
    return root


def _cache(root: Path) -> Path:
    return next(p for p in sorted((root / "caches").iterdir()) if not p.name.startswith("fff"))


def test_report_writes_page_plots_and_summary(root: Path, tmp_path: Path) -> None:
    res = kdcache("report", str(_cache(root)), "--out", str(tmp_path / "rep"))
    assert res.returncode == 0, res.stderr
    assert "tail mass" in res.stdout and "k=4" in res.stdout
    assert f"report     {tmp_path / 'rep' / 'index.html'}" in res.stdout
    for name in ("index.html", "tail_mass.png", "entropy.png", "report.json"):
        assert (tmp_path / "rep" / name).stat().st_size > 500
    data = json.loads((tmp_path / "rep" / "report.json").read_text())
    # trained positions only (loss_mask): 8 rows x 15, the last of each row is not trained
    assert data["positions"] == 8 * 15 and set(data["tail"]) == {"1", "2"}
    assert "Traceback" not in res.stderr and "it/s" not in res.stderr  # no bar off a terminal


def test_ls_lists_caches_with_rows_size_and_state(root: Path) -> None:
    res = kdcache("ls", str(root))
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].split() == ["CACHE", "NAME", "ROWS", "SHARDS", "SIZE", "STATE"]
    complete = next(ln for ln in lines if ln.startswith(_cache(root).name))
    assert "cli" in complete and "8/8" in complete and "3/3" in complete
    assert complete.rstrip().endswith(" complete") and "KiB" in complete
    partial = next(ln for ln in lines if ln.startswith("f" * 32))
    assert "5/8" in partial and "2/3" in partial and partial.rstrip().endswith("incomplete")
    data = json.loads(kdcache("ls", str(root), "--json").stdout)
    assert sorted(c["complete"] for c in data) == [False, True]
    # the caches folder itself works too; a folder without caches says so
    assert _cache(root).name in kdcache("ls", str(root / "caches")).stdout
    empty = kdcache("ls", str(root / "nothing-here"))
    assert empty.returncode == 1 and "no caches under" in empty.stdout


def test_inspect_of_a_root_lists_its_caches(root: Path) -> None:
    res = kdcache("inspect", str(root))
    assert res.returncode == 0, res.stderr
    assert "is a storage root holding 2 cache(s)" in res.stdout
    assert _cache(root).name in res.stdout and "kdcache inspect " in res.stdout
    assert "No group found" not in res.stdout + res.stderr


def test_version_and_verbose_after_the_command(root: Path) -> None:
    from importlib.metadata import version

    res = kdcache("--version")
    assert res.returncode == 0 and res.stdout.startswith(f"kdcache {version('kdcache')} ")
    after = kdcache("inspect", str(_cache(root)), "-v")
    assert after.returncode == 0, after.stderr
    assert "3/3 complete" in after.stdout


def test_did_you_mean_for_commands_and_spec_keys(
    tmp_path: Path, tiny_teacher_dir: Path, tokens_npy: Path
) -> None:
    res = kdcache("inpsect", "x")
    assert (
        res.returncode == 2 and "unknown command 'inpsect'; did you mean 'inspect'?" in res.stderr
    )
    job = _job(tmp_path, tiny_teacher_dir, tokens_npy)
    spec = yaml.safe_load(job.read_text())
    spec["outputs"]["topK"] = spec["outputs"].pop("topk")
    spec["batchsize"] = 4
    job.write_text(yaml.safe_dump(spec))
    res = kdcache("run", str(job), "--root", str(tmp_path / "r"))
    assert res.returncode == 2, res.stderr
    assert "error: outputs.topK: unknown field 'topK'; did you mean 'topk'?" in res.stderr
    assert "error: batchsize: unknown field 'batchsize'; did you mean 'batch_size'?" in res.stderr


def test_help_has_no_docstring_markup() -> None:
    commands = ["run", "inspect", "verify", "report", "ls", "serve", "worker", "submit", "jobs"]
    commands += ["cancel", "slurm", "plan"]
    for args in [[], *[[c] for c in commands]]:
        res = kdcache(*args, "--help")
        assert res.returncode == 0, (args, res.stderr)
        assert "``" not in res.stdout and ":func:" not in res.stdout, args
        assert ":mod:" not in res.stdout and "::" not in res.stdout, args
    top = kdcache("--help").stdout
    assert all(c in top for c in commands) and "KDCACHE_SERVER" in top


def test_closed_pipe_ends_quietly(root: Path) -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before kdcache writes a byte
    proc = subprocess.run(
        [sys.executable, "-m", "kdcache.cli", "inspect", str(_cache(root)), "--json"],
        stdout=write_end,
        stderr=subprocess.PIPE,
        text=True,
        timeout=120,
    )
    os.close(write_end)
    assert proc.returncode == 141
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr


def test_ctrl_c_ends_quietly() -> None:
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        # A shell that starts a job in the background (`make test &`) leaves SIGINT ignored, and
        # a Python started with SIGINT ignored keeps ignoring it: give the CLI the Ctrl-C
        # handler of an interactive terminal, whatever the test runner inherited.
        ctrl_c = (
            "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
            f"sys.argv = ['kdcache', 'jobs', '--server', {url!r}]; "
            "runpy.run_module('kdcache.cli', run_name='__main__')"
        )
        proc = subprocess.Popen(
            [sys.executable, "-c", ctrl_c],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        silent.settimeout(60)
        conn, _ = silent.accept()  # kdcache is inside its request now
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        conn.close()
    assert proc.returncode == 130, err
    assert err.strip() == "interrupted"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> str:
    settings = Settings(
        root=str(tmp_path_factory.mktemp("svc")), admin_token="adm-token", worker_token="wrk-token"
    )
    with serve(create_app(settings)) as url:
        yield url  # type: ignore[misc]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KDCACHE_")}
    return {**env, "PYTHONPATH": str(REPO), **extra}


def test_no_http_log_lines_and_the_token_error_names_the_variable(server: str) -> None:
    ok = subprocess.run(
        [sys.executable, "-m", "kdcache.cli", "jobs", "--server", server],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(),
    )
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.split()[:3] == ["ID", "NAME", "STATUS"]
    assert ok.stderr == ""  # no "HTTP Request: GET ..." INFO lines from httpx
    no_token = subprocess.run(
        [sys.executable, "-m", "kdcache.cli", "cancel", "0" * 32, "--server", server],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(),
    )
    assert no_token.returncode == 1
    assert "set KDCACHE_TOKEN" in no_token.stderr and "Traceback" not in no_token.stderr


def test_cancel(server: str, tiny_teacher_dir: Path, tokens_npy: Path, tmp_path: Path) -> None:
    env = _env(KDCACHE_SERVER=server, KDCACHE_TOKEN="adm-token")
    run = [sys.executable, "-m", "kdcache.cli"]
    job = _job(tmp_path, tiny_teacher_dir, tokens_npy, name="to-cancel")
    sub = subprocess.run([*run, "submit", str(job)], capture_output=True, text=True, env=env)
    assert sub.returncode == 0, sub.stderr
    job_id = sub.stdout.split()[2]
    res = subprocess.run([*run, "cancel", job_id], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"job {job_id}: cancelled"
    jobs = subprocess.run(
        [*run, "jobs", "--status", "cancelled"], capture_output=True, text=True, env=env
    )
    assert job_id in jobs.stdout
    again = subprocess.run([*run, "cancel", "nope"], capture_output=True, text=True, env=env)
    assert again.returncode == 1 and "not_found" in again.stderr


def test_report_of_a_served_cache(
    root: Path, tmp_path: Path, tiny_teacher_dir: Path, tokens_npy: Path
) -> None:
    """`kdcache report http://…/v1/caches/<id>` reads through the service like a local path."""
    served = tmp_path / "served"
    shutil.copytree(_cache(root), served / "caches" / _cache(root).name)
    settings = Settings(root=str(served), admin_token="admin-token-ux", read_token="read-token-ux")
    with serve(create_app(settings)) as url:
        env = _env(KDCACHE_SERVER=url, KDCACHE_TOKEN="admin-token-ux")
        job = _job(tmp_path, tiny_teacher_dir, tokens_npy)
        sub = subprocess.run(
            [sys.executable, "-m", "kdcache.cli", "submit", str(job)],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        assert sub.returncode == 0, sub.stderr
        cache_url = sub.stdout.strip().splitlines()[-1]
        assert cache_url == f"{url}/v1/caches/{_cache(root).name}"
        res = subprocess.run(
            [
                sys.executable,
                "-m",
                "kdcache.cli",
                "report",
                cache_url,
                "--out",
                str(tmp_path / "r"),
            ],
            capture_output=True,
            text=True,
            env={**env, "KDCACHE_TOKEN": "read-token-ux"},
            timeout=300,
        )
        assert res.returncode == 0, res.stderr
        got = json.loads((tmp_path / "r" / "report.json").read_text())
        want = cache_stats(CacheReader(str(_cache(root))))  # the same numbers as a local read
        assert got["positions"] == want.positions == 8 * 15  # loss_mask: not the last position
        assert got["rows_done"] == 8
        assert got["tail"]["2"]["p95"] == pytest.approx(want.tail["2"]["p95"], abs=1e-12)
        no_token = subprocess.run(
            [
                sys.executable,
                "-m",
                "kdcache.cli",
                "report",
                cache_url,
                "--out",
                str(tmp_path / "x"),
            ],
            capture_output=True,
            text=True,
            env=_env(),
            timeout=300,
        )
        assert no_token.returncode == 1 and "KDCACHE_TOKEN" in no_token.stderr, no_token.stderr
        assert "Traceback" not in no_token.stderr
