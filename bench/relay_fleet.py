"""The relay at fleet scale (issue 15): 1,000 simulated sites of 20 operators, webhook
intake and unlock API throughput with p50/p99, for one and two replicas on PostgreSQL
and one on SQLite side by side, the relay's memory per replica, how the cost grows
from 100 to 1,000 sites, and which process saturates.

Each configuration gets a fresh stack: a real Mosquitto (``devkit/mosquitto.py``), the
sandbox as Stora (in this process) holding ``--operators`` operators of ``--sites``
sites in all, ``--units`` units a site, and ``stora-relay run`` as a child process
(devkit/relay_process.py), or two on one PostgreSQL database (replica B's config a copy
of A's with its own ``listen``; one throw-away cluster, devkit/postgres.py, a database
per configuration).  The operators connect over HTTP through replica A and their sites
are registered (:func:`devkit.fleet.connect_operators`); then :class:`devkit.fleet.
Fleet` connects one simulated gateway per site (one event loop, a thread of this
process), each answering in 20–80 ms, ``failed`` 1 % of the time; the run goes on once
every site's retained status has reached the relay.  Stora's rate limit is set to 50/s
and 3,000/min per operator in the sandbox and the relay: this measures the relay, not
the partner budget.

Then :class:`devkit.fleet.LoadGenerator` (closed loop, requests spread over the
replicas in turn) runs, each for ``--window`` seconds after a warm-up:

* **webhooks**: ``--webhook-workers`` post Stora's signed ``unit.updated`` deliveries
  (each a lockout or a clear); every answer must be ``200 command``.  ``at gateway``
  is the time from the status change to the command reaching the gateway;
* **unlocks**: ``--unlock-workers`` call the unlock API with ``?wait=10``; answers ``200
  done`` (or ``failed``, the fleet's 1 %);
* **mixed**: both at once, plus ``--timeline-workers`` posting Timeline Events through
  the relay's broker (forwarded to the sandbox).

During each window the CPU time (utime + stime from /proc) of every process is taken:
each relay replica, PostgreSQL (the postmaster and its backends), Mosquitto, and this
process split by thread (the fleet's event loop, the load generator's, the rest: the
sandbox's server and delivery threads), as a share of one core (a relay at ~100 % is
one interpreter's GIL saturated), and the whole machine's busy time (/proc/stat):
``others`` is the part that is none of ours, the other users of a shared box, whose
load moves the figures from run to run.  Memory per
replica is VmRSS and VmHWM of /proc/<pid>/status at the end.  The scale table repeats
the ``--scale-config`` configuration (SQLite) at ``--scale`` site counts (100 and 300,
the same 20 operators), next to its 1,000-site run.

``--profile CONFIG`` adds a run of that configuration whose replica A carries two probes
and prints what they saw.  A wall-clock stack sampler (every 10 ms, where each thread
of the relay is: the innermost frame and the innermost ones of relay/ code) shows what
the threads *wait* on, which cProfile would not (it times CPU in the one thread that
enables it; the relay's database work runs in worker threads).  bench/_relay_trace.py's
``--trace`` times each step of the link and the unlock API; the share of wall time a
step took shows whether one of the link's loops (the publisher's ``plan``, the reader's
``apply``: each one at a time) is saturated.

Kept for a shared 2-core machine: the defaults take ~5.5 minutes, ~7 with ``--profile``
(``--quick``: 200 sites of 5 operators, 4 s phases, no mixed phase, ~2 minutes).

Run: ``PYTHONPATH=. .venv/bin/python bench/relay_fleet.py [--quick] [--profile sqlite]``
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from _relay_trace import probe_main, read_trace
from _site import cpu_seconds, proc_status
from sqlalchemy import func, select

from devkit.fleet import (
    Behaviour,
    Fleet,
    LoadGenerator,
    LoadMix,
    Stream,
    connect_operators,
    operator_specs,
    percentile,
    populate,
    raise_nofile_limit,
)
from devkit.mosquitto import Broker, free_port
from devkit.postgres import Postgres
from devkit.relay_process import RelayProcess
from devkit.relay_site import write_relay_config
from devkit.sandbox import PartnerApp, Sandbox
from relay.db.engine import Database
from relay.db.models import Site

CLIENT_ID, CLIENT_SECRET = "fleet-bench-client", "fleet-bench-secret"
SOURCE_ID = "tsrc_fleet"
RATE_PER_S, RATE_PER_MIN = 50, 3000
UNLOCK_WAIT_S = 10.0
CONFIGS = {"sqlite": ("sqlite", 1), "pg1": ("postgresql", 1), "pg2": ("postgresql", 2)}
TITLES = {"sqlite": "SQLite, 1", "pg1": "PostgreSQL, 1", "pg2": "PostgreSQL, 2"}


# --------------------------------------------------------------------------- CPU, memory


def _task_seconds(pid: int, tid: int) -> float:
    stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                stat = (entry / "stat").read_text()
                if int(stat[stat.rindex(")") + 2:].split()[1]) == pid:
                    found.append(int(entry.name))
    return found


@dataclass
class Processes:
    """The processes of one configuration, by the name the tables give them."""

    relays: list[int]
    broker: int
    postmaster: int | None
    fleet_thread: int

    def seconds(self) -> dict[str, dict[int, float]]:
        """CPU seconds so far of each, by process or thread id (PostgreSQL: the
        postmaster and its backends), and of the whole machine (``machine``, id 0)."""
        out = {f"relay {'AB'[i]}": {pid: cpu_seconds(pid)} for i, pid in enumerate(self.relays)}
        if self.postmaster is not None:
            out["postgres"] = {p: _safe(cpu_seconds, p)
                               for p in [self.postmaster, *_children(self.postmaster)]}
        out["mosquitto"] = {self.broker: cpu_seconds(self.broker)}
        me, loop = os.getpid(), threading.get_native_id()
        out["fleet loop"] = {self.fleet_thread: _task_seconds(me, self.fleet_thread)}
        out["load gen"] = {loop: _task_seconds(me, loop)}
        out["sandbox+rest"] = {me: cpu_seconds(me) - out["fleet loop"][self.fleet_thread]
                               - out["load gen"][loop]}
        jiffies = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        idle = jiffies[3] + jiffies[4]  # idle, iowait
        out["machine"] = {0: (sum(jiffies[:8]) - idle) / os.sysconf("SC_CLK_TCK")}
        return out

    @contextlib.contextmanager
    def sampled(self, into: dict[str, float]) -> Iterator[None]:
        """CPU share of one core of each over the block, and ``others``: the machine's
        busy time that is none of ours (other users of a shared box).  A PostgreSQL
        backend started meanwhile counts from its start, one that ended is lost (the
        pool keeps them)."""
        before, began = self.seconds(), time.monotonic()
        yield
        after, took = self.seconds(), time.monotonic() - began
        for name, now in after.items():
            was = before.get(name, {})
            into[name] = 100 * sum(v - was.get(i, 0.0) for i, v in now.items()) / took
        into["others"] = into["machine"] - sum(v for k, v in into.items() if k != "machine")


def _safe(read: Callable[[int], float], pid: int) -> float:
    try:
        return read(pid)
    except OSError:  # ended meanwhile
        return 0.0


# --------------------------------------------------------------------------- one run


@dataclass
class Result:
    """One configuration's figures."""

    name: str
    sites: int
    streams: dict[str, dict[str, Stream]] = field(default_factory=dict)
    at_gateway: list[float] = field(default_factory=list)
    cpu: dict[str, dict[str, float]] = field(default_factory=dict)
    memory: list[tuple[int, int]] = field(default_factory=list)
    setup_s: float = 0.0
    profile: Path | None = None
    #: Wall-clock spans of the measured phases.
    windows: list[tuple[float, float]] = field(default_factory=list)


class ProfiledRelay(RelayProcess):
    """A relay under this script's ``--profile-child`` (the module docstring): its
    samples and trace go to ``out`` (a directory)."""

    def __init__(self, config: Path, *, port: int, log: Path, out: Path) -> None:
        super().__init__(config, port=port, log=log)
        self.out = out

    @property
    def argv(self) -> list[str]:
        return [sys.executable, str(Path(__file__).resolve()), "--profile-child",
                str(self.out), "--", "run", "--config", str(self.config)]


def _config(directory: Path, sandbox: Sandbox, broker: Broker, port: int,
            database: str | None) -> Path:
    config = write_relay_config(directory, stora_url=sandbox.url, client_id=CLIENT_ID,
                                client_secret=CLIENT_SECRET, listen_port=port,
                                mqtt_port=broker.port, database=database,
                                app_name="FleetEntry", timeline_source_id=SOURCE_ID)
    line = f'timeline_source_id = "{SOURCE_ID}"'
    config.write_text(config.read_text().replace(
        line, f"{line}\nmax_per_second = {RATE_PER_S}\nmax_per_minute = {RATE_PER_MIN}"))
    return config


def _replica(config: Path, directory: Path, port: int, first_port: int) -> Path:
    """Replica B's config: a copy of A's directory (secrets, data key, database) with
    its own ``listen``."""
    shutil.copytree(config.parent, directory)
    path = directory / config.name
    path.write_text(path.read_text().replace(f"127.0.0.1:{first_port}", f"127.0.0.1:{port}"))
    return path


def run_config(name: str, sites: int, args: argparse.Namespace, parent: Path,
               pg: Postgres | None, *, profile: bool = False) -> Result:
    """One configuration, start to stop (the module docstring)."""
    backend, replicas = CONFIGS[name]
    result = Result(name, sites)
    began = time.monotonic()
    directory = Path(tempfile.mkdtemp(prefix=f"fleet-{name}-{sites}-", dir=parent))
    ports = [free_port() for _ in range(replicas)]
    url = f"http://127.0.0.1:{ports[0]}"
    specs = operator_specs(args.operators, sites // args.operators, args.units)
    site_ids = [str(s["id"]) for spec in specs.values() for s in spec]
    app = PartnerApp(CLIENT_ID, CLIENT_SECRET, (url + "/oauth/callback",), name="FleetEntry")
    database = pg.create_database() if backend == "postgresql" and pg else None
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, directory, ignore_errors=True)
        broker = Broker(directory / "broker")
        broker.start()
        stack.callback(broker.close)
        sandbox = stack.enter_context(Sandbox(
            partner_app=app, max_per_second=RATE_PER_S, max_per_minute=RATE_PER_MIN,
            webhook_retry_s=(0.05,), webhook_timeout_s=5.0))
        populate(sandbox, specs)
        config = _config(directory / "relay-a", sandbox, broker, ports[0], database)
        configs = [config] + [_replica(config, directory / "relay-b", p, ports[0])
                              for p in ports[1:]]
        relays: list[RelayProcess] = []
        for i, (path, port) in enumerate(zip(configs, ports, strict=True)):
            log = directory / f"relay-{'ab'[i]}.log"
            if profile and i == 0:
                result.profile = parent / f"probes-{name}-{sites}"
                result.profile.mkdir()
                relay: RelayProcess = ProfiledRelay(path, port=port, log=log,
                                                    out=result.profile)
            else:
                relay = RelayProcess(path, port=port, log=log)
            relay.start(timeout=60)
            stack.callback(relay.terminate, 60)  # a profiled relay writes at exit
            relays.append(relay)
        db = Database(database or f"sqlite:///{directory / 'relay-a' / 'relay.db'}")
        stack.callback(db.close)
        links = connect_operators(sandbox, url, db, specs, timeout=300)
        fleet = Fleet(broker.host, broker.port, site_ids, behaviour=Behaviour(
            delay_s=(args.delay_min_ms / 1000, args.delay_max_ms / 1000),
            failure_rate=args.failure_rate, seed=args.seed))
        fleet.start(timeout=120)
        stack.callback(fleet.stop)
        _wait_online(db, len(site_ids), relays)
        result.setup_s = time.monotonic() - began
        assert fleet.native_id is not None
        procs = Processes([r.pid for r in relays], broker.pid,
                          pg.pid_or_none() if database and pg else None, fleet.native_id)
        load = LoadGenerator(sandbox, fleet, links, [r.url for r in relays],
                             source_id=SOURCE_ID)
        w, u, t = args.webhook_workers, args.unlock_workers, args.timeline_workers
        load.run(LoadMix(args.warmup, webhooks=w, unlocks=u, timeline=t,
                         unlock_wait_s=UNLOCK_WAIT_S))
        phases = {"webhooks": LoadMix(args.window, webhooks=w),
                  "unlocks": LoadMix(args.window, unlocks=u, unlock_wait_s=UNLOCK_WAIT_S),
                  "mixed": LoadMix(args.window, webhooks=w, unlocks=u, timeline=t,
                                   unlock_wait_s=UNLOCK_WAIT_S)}
        for phase, mix in phases.items():
            if phase == "mixed" and args.quick:
                continue
            if phase == "webhooks":
                load.changed.clear()
            result.cpu[phase] = {}
            marker = result.profile / "sampling" if result.profile else None
            with procs.sampled(result.cpu[phase]):
                if marker is not None:
                    marker.touch()  # the stack sampler samples while it exists
                start = time.time()
                result.streams[phase] = load.run(mix)
                result.windows.append((start, time.time()))
                if marker is not None:
                    marker.unlink()
            if phase == "webhooks":
                time.sleep(1.0)  # the last commands reach their gateways
                result.at_gateway = load.intent_latencies()
        result.memory = [(s["VmRSS"], s["VmHWM"]) for s in
                         (proc_status(r.pid) for r in relays)]
    if database and pg:
        pg.drop_database(database.rsplit("/", 1)[1])
    return result


def _wait_online(db: Database, sites: int, relays: Sequence[RelayProcess],
                 timeout: float = 120.0) -> None:
    """Until the relay has every site's retained status, online."""
    deadline = time.monotonic() + timeout
    while True:
        with db.read() as s:
            online = s.scalar(select(func.count()).select_from(Site).where(
                Site.online.is_(True))) or 0
        if online >= sites:
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"{online} of {sites} sites online at the relay after "
                             f"{timeout} s\n{relays[0].log_tail()}")
        time.sleep(0.2)


# --------------------------------------------------------------------------- tables


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.0f}" if seconds == seconds else "-"  # nan: no sample


def _stream_cells(s: Stream | None) -> tuple[str, str]:
    if s is None:
        return "-", "-"
    return f"{s.rate:,.0f}/s", f"{_ms(s.p(50))} / {_ms(s.p(99))}"


def _problems(result: Result) -> list[str]:
    """Answers other than the expected ones, and transport errors."""
    expected = {"webhooks": {"200 command"}, "unlocks": {"200 done", "200 failed"},
                "timeline": {"201"}}
    found = []
    for phase, streams in result.streams.items():
        for name, s in streams.items():
            odd = {k: v for k, v in s.answers.items() if k not in expected[name]}
            if odd or s.errors:
                found.append(f"{result.name} {result.sites} sites, {phase}/{name}: "
                             f"{dict(odd)} {dict(s.errors)}")
    return found


def rows_of(result: Result) -> dict[str, str]:
    """One column of the main table."""
    rows: dict[str, str] = {}
    hooks = result.streams.get("webhooks", {}).get("webhooks")
    unlocks = result.streams.get("unlocks", {}).get("unlocks")
    rows["webhooks accepted"], rows["  p50 / p99 ms"] = _stream_cells(hooks)
    at = result.at_gateway
    rows["  status change -> at gateway p50/p99"] = \
        f"{_ms(percentile(at, 50))} / {_ms(percentile(at, 99))}"
    rows["unlocks answered"], rows["  p50 / p99 ms "] = _stream_cells(unlocks)
    mixed = [result.streams.get("mixed", {}).get(n) for n in ("webhooks", "unlocks",
                                                              "timeline")]
    if all(mixed):
        rows["mixed: webhooks / unlocks / events"] = " / ".join(
            f"{s.rate:.0f}" for s in mixed if s) + "/s"
        rows["  their p99 ms"] = " / ".join(_ms(s.p(99)) for s in mixed if s)
    rows["RSS / peak MiB per replica"] = ", ".join(
        f"{rss / 1024:.0f}/{hwm / 1024:.0f}" for rss, hwm in result.memory)
    rows["setup s (connect, sites, fleet up)"] = f"{result.setup_s:.0f}"
    return rows


def cpu_columns(results: Sequence[Result]) -> dict[str, dict[str, str]]:
    """CPU % of one core by process, a column per configuration and phase."""
    return {f"{r.name} {phase[:4]}": {proc: f"{share:.0f}" for proc, share in cpu.items()}
            for r in results for phase, cpu in r.cpu.items() if phase != "mixed"}


def print_table(title: str, columns: dict[str, dict[str, str]], width: int = 18) -> None:
    """Rows by name, one column per configuration."""
    names: list[str] = []
    for column in columns.values():
        names += [n for n in column if n not in names]
    first = max(len(n) for n in names) + 2
    print(f"\n{title}")
    print(" " * first + "".join(f" {c:>{width}}" for c in columns))
    for n in names:
        print(f"{n:{first}}" + "".join(f" {col.get(n, '-'):>{width}}"
                                       for col in columns.values()))


def print_profile(out: Path, windows: list[tuple[float, float]], lines: int = 16) -> None:
    """What the probes of the profiled replica saw (the module docstring)."""
    samples = [(str(k), int(n)) for k, n in json.loads((out / "samples.json").read_text())]
    # Idle: a worker thread or the event loop (uvicorn's serve) waiting for work.
    busy = [(k, n) for k, n in samples if "| server.py" not in k
            and (" | " in k or k.split()[-1] not in ("wait", "_worker", "select"))]
    total = sum(n for _, n in busy) or 1
    print(f"\nwhere replica A's threads were in the measured phases, not idle ({total} "
          "samples of 10 ms; leaf | innermost relay/ frames):")
    for key, n in busy[:lines]:
        print(f"  {100 * n / total:5.1f} %  {key}")
    events = read_trace(out / "trace.json")
    span = sum(end - start for start, end in windows)
    print(f"its steps in the measured phases ({span:.0f} s; bench/_relay_trace.py): n, mean, "
          "p99, max ms; load = their summed time / the phases' (over 100 %: concurrent)")
    for name in ("authenticate", "submit", "record", "plan", "mark", "apply"):
        took = [b - a for n, a, b, _ in events if n == name
                and any(start <= a <= end for start, end in windows)]
        if took:
            print(f"  {name:12} {len(took):6d} {1e3 * sum(took) / len(took):7.1f} "
                  f"{1e3 * percentile(took, 99):7.1f} {1e3 * max(took):8.1f}   load "
                  f"{100 * sum(took) / span:5.0f} %")


# --------------------------------------------------------------------------- main


def _sample_stacks(out: Path, every_s: float = 0.01) -> None:
    """Every ``every_s`` while ``sampling`` exists beside ``out`` (the measured phases),
    count where each other thread of this process is (its innermost frame, and the two
    innermost frames of relay/ code); written to ``out`` at exit."""
    counts: Counter[str] = Counter()

    def where(frame: FrameType) -> str:
        def name(f: FrameType) -> str:
            return f"{Path(f.f_code.co_filename).name}:{f.f_lineno} {f.f_code.co_name}"

        ours: list[str] = []
        f: FrameType | None = frame
        while f is not None and len(ours) < 2:
            if "/relay/" in f.f_code.co_filename and "-packages" not in f.f_code.co_filename:
                ours.append(name(f))
            f = f.f_back
        return name(frame) + (" | " + " < ".join(ours) if ours else "")

    def sample() -> None:
        me, marker = threading.get_ident(), out.with_name("sampling")
        while True:
            if marker.exists():
                for ident, frame in sys._current_frames().items():
                    if ident != me:
                        counts[where(frame)] += 1
            time.sleep(every_s)

    threading.Thread(target=sample, name="stack-sampler", daemon=True).start()
    atexit.register(lambda: out.write_text(json.dumps(counts.most_common(300))))


def main() -> None:
    """Run the configurations and print the tables."""
    if len(sys.argv) > 2 and sys.argv[1] == "--profile-child":  # in the profiled relay
        out = Path(sys.argv[2])
        out.mkdir(parents=True, exist_ok=True)
        _sample_stacks(out / "samples.json")
        sys.exit(probe_main(["--trace", str(out / "trace.json"), *sys.argv[3:]]))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="200 sites of 5 operators, "
                        "short windows, no mixed phase, scale 50 and 100")
    parser.add_argument("--sites", type=int, default=1000)
    parser.add_argument("--operators", type=int, default=20)
    parser.add_argument("--units", type=int, default=4, help="units a site")
    parser.add_argument("--configs", default="sqlite,pg1,pg2")
    parser.add_argument("--scale", default=None,
                        help="site counts of the scale table (100,300; quick: 50,100)")
    parser.add_argument("--scale-config", default="sqlite", choices=sorted(CONFIGS))
    parser.add_argument("--window", type=float, default=8.0, help="seconds a phase")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--webhook-workers", type=int, default=16)
    parser.add_argument("--unlock-workers", type=int, default=32)
    parser.add_argument("--timeline-workers", type=int, default=2)
    parser.add_argument("--delay-min-ms", type=float, default=20)
    parser.add_argument("--delay-max-ms", type=float, default=80)
    parser.add_argument("--failure-rate", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=15)
    parser.add_argument("--profile", choices=sorted(CONFIGS), default=None,
                        help="also run this configuration with probes in replica A")
    parser.add_argument("--dir", default=None)
    args = parser.parse_args()
    if args.quick:
        args.sites, args.operators, args.window = 200, 5, 4.0
    raise_nofile_limit()
    names = [n for n in args.configs.split(",") if n]
    if args.scale is None:
        args.scale = "50,100" if args.quick else "100,300"
    scale = [int(n) for n in args.scale.split(",") if n]
    parent = Path(tempfile.mkdtemp(prefix="relay-fleet-", dir=args.dir))
    try:
        began = time.monotonic()
        results: list[Result] = []
        with contextlib.ExitStack() as stack:
            pg = None
            if any(CONFIGS[n][0] == "postgresql" for n in [*names, args.scale_config]):
                pg = stack.enter_context(Postgres())  # its own directory: as root, the
                # cluster belongs to "postgres", who could not reach one inside ours
            for name in names:
                results.append(run_config(name, args.sites, args, parent, pg))
                print(f"[{time.monotonic() - began:.0f} s] {name} at {args.sites} sites done",
                      flush=True)
            for sites in scale:
                results.append(run_config(args.scale_config, sites, args, parent, pg))
                print(f"[{time.monotonic() - began:.0f} s] {args.scale_config} at {sites} "
                      "sites done", flush=True)
            profiled = run_config(args.profile, args.sites, args, parent, pg, profile=True) \
                if args.profile else None
        print(f"\nrelay at fleet scale: {args.sites} simulated sites of {args.operators} "
              f"operators, {args.units} units a site; gateways answer in "
              f"{args.delay_min_ms:.0f}-{args.delay_max_ms:.0f} ms, failed "
              f"{args.failure_rate:.0%}; {args.webhook_workers} webhook / "
              f"{args.unlock_workers} unlock / {args.timeline_workers} timeline workers, "
              f"{args.window:.0f} s a phase; {os.cpu_count()} cores; "
              f"{time.monotonic() - began:.0f} s in all")
        main_runs = {TITLES[r.name]: rows_of(r) for r in results[:len(names)]}
        print_table("configuration (database, replicas):", main_runs)
        print_table("CPU % of one core while webhooks / unlocks ran (others: the rest of the "
                    "machine's busy time, not this benchmark's):",
                    cpu_columns(results[:len(names)]), width=11)
        scale_runs = {f"{r.sites} sites": rows_of(r) for r in results[len(names):]}
        scale_runs.update({f"{r.sites} sites": rows_of(r) for r in results[:len(names)]
                           if r.name == args.scale_config})
        if len(scale_runs) > 1:
            for r in (r for r in results if r.name == args.scale_config):
                for phase, cpu in r.cpu.items():
                    rows = scale_runs.get(f"{r.sites} sites")
                    if rows is not None and phase != "mixed":
                        rows[f"relay CPU % ({phase})"] = f"{cpu['relay A']:.0f}"
            keep = ("webhooks accepted", "  p50 / p99 ms", "unlocks answered", "  p50 / p99 ms ",
                    "RSS / peak MiB per replica", "relay CPU % (webhooks)",
                    "relay CPU % (unlocks)")
            print_table(f"how cost grows with sites ({TITLES[args.scale_config]}):",
                        {k: {n: v[n] for n in keep if n in v}
                         for k, v in sorted(scale_runs.items(), key=lambda kv: int(
                             kv[0].split()[0]))})
        problems = [p for r in results for p in _problems(r)]
        print("\nunexpected answers: " + ("; ".join(problems) if problems else "none"))
        if profiled is not None and profiled.profile is not None:
            print_table("the run with probes (a little slower):",
                        {TITLES[profiled.name]: rows_of(profiled)})
            print_table("its CPU %:", cpu_columns([profiled]), width=11)
            print_profile(profiled.profile, profiled.windows)
    finally:
        shutil.rmtree(parent, ignore_errors=True)


if __name__ == "__main__":
    main()
