"""Every CLI command runs with networking disabled.

The commands (fit of a teacher logging to W&B and of a student distilled from its bank, test, predict,
slices, phantom, report, benchmark, sweep, config) run as subprocesses behind up to two layers:

1. always: a ``sitecustomize.py`` on ``PYTHONPATH`` (so every Python process, including sweep trials
   and benchmark workers, loads it) makes ``connect``/``connect_ex``/``create_connection``/
   ``getaddrinfo`` raise ``ENETUNREACH`` for internet sockets (AF_INET/AF_INET6, localhost included)
   and logs each attempt to ``$LD_NET_LOG``;
2. when ``unshare -rn`` works: a user + network namespace without any network device, not even
   loopback, which also covers non-Python children (W&B's Go ``wandb-core`` service).

Unix-domain sockets are left alone in both layers: W&B's local service talks to its own process over
one, and that is not networking (a network namespace does not remove them either).
"""

import glob
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, TINY_STUDENT, TINY_TEACHER

SITECUSTOMIZE = '''\
"""Written by tests/test_offline.py: no internet sockets in this process (AF_UNIX still works)."""
import errno
import os
import socket
import threading

_INET = (socket.AF_INET, socket.AF_INET6)
_LOG = os.environ.get("LD_NET_LOG")
_busy = threading.local()  # recursion guard: logging must never re-enter _block


def _name(family):
    try:
        return socket.AddressFamily(family).name
    except ValueError:
        return str(family)


def _block(family, address):
    if _LOG and not getattr(_busy, "on", False):
        _busy.on = True
        try:
            with open(_LOG, "a") as f:
                f.write(f"{os.getpid()} {_name(family)} {address!r}\\n")
        except OSError:
            pass
        finally:
            _busy.on = False
    raise OSError(errno.ENETUNREACH, "network disabled by the test")


_connect, _connect_ex = socket.socket.connect, socket.socket.connect_ex


def connect(self, address):
    if self.family in _INET:
        _block(self.family, address)
    return _connect(self, address)


def connect_ex(self, address):
    if self.family in _INET:
        _block(self.family, address)
    return _connect_ex(self, address)


def create_connection(address, *args, **kwargs):
    _block(socket.AF_INET, address)


_getaddrinfo = socket.getaddrinfo


def getaddrinfo(host, port, family=0, *args, **kwargs):
    if family in (0, *_INET):  # AF_UNSPEC resolves to internet addresses too
        _block(family, (host, port))
    return _getaddrinfo(host, port, family, *args, **kwargs)


socket.socket.connect, socket.socket.connect_ex = connect, connect_ex
socket.create_connection, socket.getaddrinfo = create_connection, getaddrinfo
'''

TEACHER = os.path.join(REPO, "experiments/teacher.yaml")
STUDENT = os.path.join(REPO, "experiments/student.yaml")
CMEDL_BENCH = os.path.join(REPO, "experiments/benchmarks/cmedl.yaml")  # the fastest --quick grid (2 runs, no teacher)


def _unshare_works():
    if not shutil.which("unshare"):
        return False
    return subprocess.run(["unshare", "-rn", "true"], capture_output=True).returncode == 0


def _wandb_run_files(out):
    return glob.glob(str(Path(out) / "wandb" / "offline-run-*" / "run-*.wandb"))


@pytest.mark.slow
def test_every_cli_command_runs_without_network(tmp_path):
    site, logs = tmp_path / "site", tmp_path / "logs"
    site.mkdir()
    logs.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    net_log = logs / "blocked.txt"
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg",
           "PYTHONPATH": os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])])}
    for key in ("WANDB_API_KEY", "WANDB_BASE_URL"):
        env.pop(key, None)
    prefix = ["unshare", "-rn"] if _unshare_works() else []
    layers = ["sitecustomize"] + (["unshare -rn (user + network namespace)"] if prefix else [])
    print(f"network disabled by: {', '.join(layers)}")

    # the guard is live in a child process (else the test would pass vacuously): each patched call to
    # localhost is refused by the sitecustomize itself (its message), while a Unix socket pair still works
    probe = """if True:
        import errno, socket
        a, b = socket.socketpair()
        a.sendall(b"x")
        assert b.recv(1) == b"x"
        for attempt in (lambda: socket.create_connection(("127.0.0.1", 9), timeout=2),
                        lambda: socket.socket().connect(("127.0.0.1", 9)),
                        lambda: socket.socket(socket.AF_INET6).connect_ex(("::1", 9)),
                        lambda: socket.getaddrinfo("localhost", 9)):
            try:
                attempt()
            except OSError as e:
                assert e.errno == errno.ENETUNREACH and "network disabled by the test" in str(e), e
                print("blocked")
            else:
                raise SystemExit("not blocked")
    """
    r = subprocess.run([*prefix, sys.executable, "-c", probe], env={**env, "LD_NET_LOG": str(logs / "probe.txt")},
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.split() == ["blocked"] * 4, r.stdout + r.stderr
    assert len((logs / "probe.txt").read_text().splitlines()) == 4
    assert "AF_INET ('127.0.0.1', 9)" in (logs / "probe.txt").read_text()

    env["LD_NET_LOG"] = str(net_log)
    times = {}

    def cli(name, *args):
        with open(net_log, "a") as f:  # marks which command the following blocked attempts (if any) came from
            f.write(f"# {name}\n")
        t0 = time.time()
        r = subprocess.run([*prefix, sys.executable, "-m", "lightning_distill.cli", *map(str, args)], env=env,
                           cwd=tmp_path, capture_output=True, text=True, timeout=900)
        times[name] = round(time.time() - t0, 1)
        (logs / f"{name}.out").write_text(r.stdout + "\n--- stderr ---\n" + r.stderr)
        assert r.returncode == 0, f"{name} exited {r.returncode}:\n{r.stderr[-3000:]}"
        return r.stdout

    # fit: a teacher logging to W&B (offline), then a student distilled from its bank
    teacher, student = tmp_path / "teacher", tmp_path / "student"
    cli("fit-teacher", "fit", TEACHER, f"output_dir={teacher}", *TINY_TEACHER, "logger=wandb")
    assert (teacher / "results.json").is_file() and (teacher / "prototypes.pt").is_file()
    assert _wandb_run_files(teacher), "no offline W&B run file"
    bank = teacher / "prototypes.pt"
    cli("fit-student", "fit", STUDENT, f"output_dir={student}", *TINY_STUDENT, f"distill.prototypes={bank}")
    assert (student / "results.json").is_file()
    ckpt = next(p for p in (student / "checkpoints" / n for n in ("best.ckpt", "last.ckpt")) if p.is_file())

    cli("test", "test", ckpt, "--out", tmp_path / "test.json")
    assert (tmp_path / "test.json").is_file()

    # phantom volumes -> single slices -> the student's masks
    vols, sl, pred = tmp_path / "vols", tmp_path / "slices", tmp_path / "pred"
    cli("phantom", "phantom", TEACHER, vols, "data.num_subjects=3", "data.shape=[64,64,16]")
    assert len(list((vols / "imagesTr").glob("*.nii.gz"))) == 3 and (vols / "dataset.json").is_file()
    cli("slices", "slices", vols, sl, "--max-area", "liver")
    assert len(list((sl / "imagesTr").glob("*.nii.gz"))) == 3 and (sl / "dataset.json").is_file()
    cli("predict", "predict", ckpt, sl / "imagesTr", pred)
    assert len(list(pred.glob("*.nii.gz"))) == 3

    rep = tmp_path / "report"
    table = cli("report", "report", teacher, student, "--plot", rep / "dice.png",
                "--bank-plot", bank, rep / "bank.png")
    assert "|" in table and (rep / "dice.png").is_file() and (rep / "bank.png").is_file()

    # --quick puts the report into <output_dir>-quick, so nothing is written into the repo's docs/;
    # one job: the same runs without a worker pool's start-up time
    bench = tmp_path / "bench"
    cli("benchmark", "benchmark", CMEDL_BENCH, "--quick", "--jobs", "1", "seeds=[0]", f"output_dir={bench}")
    assert (Path(f"{bench}-quick") / "report.md").is_file() and (Path(f"{bench}-quick") / "results.jsonl").is_file()

    # a one-trial local sweep whose command logs to W&B, like the repo's sweeps
    sweep_yaml, sweep_out = tmp_path / "sweep.yaml", tmp_path / "sweep"
    sweep_yaml.write_text(
        "name: offline\nmethod: grid\nmetric: {name: val/dice, goal: maximize}\n"
        "parameters:\n  distill.weight: {values: [1.0]}\n"
        f"command: ['${{env}}', '${{interpreter}}', -m, lightning_distill.cli, fit, {STUDENT}, logger=wandb, "
        "'${args_no_hyphens}']\n")
    cli("sweep", "sweep", sweep_yaml, *TINY_STUDENT, f"distill.prototypes={bank}",
        "--local", "--count", "1", "--out", sweep_out)
    assert (sweep_out / "results.md").is_file() and (sweep_out / "trial_000" / "results.json").is_file()
    assert _wandb_run_files(sweep_out / "trial_000"), "no offline W&B run file for the sweep trial"

    assert "stage: student" in cli("config", "config", STUDENT)

    print("seconds per command:", times)
    blocked = net_log.read_text()
    print(f"blocked connection attempts ({net_log}):\n{blocked}")
    # in practice nothing tries (checked with both layers and with the sitecustomize alone)
    assert all(line.startswith("# ") for line in blocked.splitlines()), "a command tried to reach the network"
