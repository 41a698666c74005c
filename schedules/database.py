"""Tuning databases: one MetaSchedule JSON database per target, safe to kill, repaired on open, shipped defaults.

MetaSchedule's JSON database appends one line per workload (database_workload.json) and one per measured
candidate (database_tuning_record.json, `[workload_index, record]`), so a run killed at any moment loses at
most the line being written. `open_database` drops such a torn or otherwise unreadable line (and records that
point at a dropped workload), says so, and rewrites the files atomically before MetaSchedule reads them.

Beside the two files, `tasks.json` keeps edgeq's own ledger per workload: its task name, whether tuning it
finished (a tuned workload is never tuned again), and the latencies of edgeq's default schedule and of the best
record timed side by side (`default_ms`, `tuned_ms`): a tuned schedule is used only where it wins there.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from targets.atomic import write_atomic
from targets.errors import EdgeqError

WORKLOADS = "database_workload.json"
RECORDS = "database_tuning_record.json"
LEDGER = "tasks.json"
SHIPPED = Path(__file__).parent / "databases"  # schedules/databases/<preset>/: written by `edgeq tune --zoo`


def database_name(preset) -> str:
    """A preset's database name: its own, or for the detected host, the CPU model too (its records fit only it)."""
    name = preset.name if preset.name != "host" else f"host-{preset.target.get('mcpu', 'generic')}"
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def target_dir(work_dir: str | os.PathLike, preset) -> Path:
    """The database directory of one target inside a tuning work dir."""
    return Path(work_dir) / database_name(preset)


def databases_for(preset, tuning_db: str | os.PathLike | None = None, shipped: bool = True) -> list[Path]:
    """The database directories a build for `preset` reads: the user's (a work dir or one target's directory),
    then the one shipped with edgeq."""
    found = []
    if tuning_db is not None:
        root = Path(tuning_db)
        candidates = [root, target_dir(root, preset)]
        directory = next((d for d in candidates if (d / RECORDS).exists()), None)
        if directory is None:
            raise EdgeqError(f"no tuning database for {database_name(preset)} in {root} "
                             f"(expected {target_dir(root, preset) / RECORDS}; create it with `edgeq tune`)")
        found.append(directory)
    if shipped and (target_dir(SHIPPED, preset) / RECORDS).exists():
        found.append(target_dir(SHIPPED, preset))
    return found


MARGIN = 0.03  # what a tuned schedule must win by, side by side, to replace the default (timing noise)


def tuned_wins(entry: dict) -> bool:
    """Whether a ledger entry's best record beat the default schedule when the two were timed side by side."""
    tuned, default = entry.get("tuned_ms"), entry.get("default_ms")
    return tuned is not None and default is not None and tuned < default * (1 - MARGIN)


def untimed_workloads(directory: Path) -> list[str]:
    """Task names of the workloads with records that were never timed beside the default (an older database):
    builds do not use them until `edgeq tune` runs again on that work dir."""
    ledger = load_ledger(directory)
    return sorted(ledger.get(k, {}).get("task", k) for k in _best_records(directory)
                  if "tuned_ms" not in ledger.get(k, {}))


def json_lines(path: Path) -> tuple[list, list[int]]:
    """Parsed lines of a JSON-lines file and the (1-based) numbers of the lines that did not parse."""
    parsed, bad = [], []
    if path.exists():
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                parsed.append(json.loads(line))
            except ValueError:
                bad.append(number)
    return parsed, bad


def repair(directory: Path) -> list[str]:
    """Drop unreadable lines from a database directory; returns one message per problem found (empty: clean)."""
    workloads, bad_workloads = json_lines(directory / WORKLOADS)
    records, bad_records = json_lines(directory / RECORDS)
    problems = [f"{directory / WORKLOADS}: skipped unreadable line {n}" for n in bad_workloads]
    problems += [f"{directory / RECORDS}: skipped unreadable line {n}" for n in bad_records]
    if bad_workloads:  # later workloads move up: renumber the records that point at them
        valid = [n for n in range(1, len(workloads) + len(bad_workloads) + 1) if n not in bad_workloads]
        new_index = {old - 1: new for new, old in enumerate(valid)}
        kept = [[new_index[r[0]], r[1]] for r in records if isinstance(r, list) and r and r[0] in new_index]
        if len(kept) < len(records):
            problems.append(f"{directory / RECORDS}: skipped {len(records) - len(kept)} records of unreadable workloads")
        records = kept
    if problems:
        write_atomic(directory / WORKLOADS, "".join(json.dumps(w) + "\n" for w in workloads))
        write_atomic(directory / RECORDS, "".join(json.dumps(r) + "\n" for r in records))
    return problems


def open_database(directory: str | os.PathLike, create: bool = True):
    """The MetaSchedule JSON database in `directory`, repaired first. Returns (database, problems)."""
    from tvm.s_tir import meta_schedule as ms

    directory = Path(directory)
    if not directory.is_dir():
        if not create:
            raise EdgeqError(f"no tuning database at {directory}")
        directory.mkdir(parents=True)
    problems = repair(directory)
    try:
        database = ms.database.JSONDatabase(work_dir=str(directory), module_equality="structural")
    except Exception as e:  # noqa: BLE001 - any failure to load is a damaged database, whatever TVM raised
        raise EdgeqError(f"cannot read the tuning database in {directory}: {str(e).strip().splitlines()[-1]}") from None
    return database, problems


def load_ledger(directory: Path) -> dict:
    path = Path(directory) / LEDGER
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError:
        return {}  # rebuilt from what gets tuned next; the records themselves are intact


def save_ledger(directory: Path, ledger: dict) -> None:
    write_atomic(Path(directory) / LEDGER, json.dumps(ledger, indent=1, sort_keys=True) + "\n")



def _mean_secs(record) -> float:
    secs = [float(s) for s in (record[1] or [])]
    return sum(secs) / len(secs) if secs else float("inf")


def _best_records(directory: Path) -> dict[str, tuple[list, list]]:
    """Each workload's fastest record that ran (MetaSchedule's best, the one timed beside the default):
    workload key -> (workload line, record)."""
    workloads, _ = json_lines(directory / WORKLOADS)
    records, _ = json_lines(directory / RECORDS)
    best: dict[str, tuple[list, list]] = {}
    for index, record in records:
        if index >= len(workloads):  # a database not repaired yet (repair drops such records)
            continue
        key = workloads[index][0]
        if _mean_secs(record) < 1e9 and (key not in best or _mean_secs(record) < _mean_secs(best[key][1])):
            best[key] = (workloads[index], record)
    return best


def export_winners(source: str | os.PathLike, destination: str | os.PathLike) -> int:
    """Ship into `destination` each workload of `source` whose best record beat the default side by side.

    What edgeq ships: only records a build would apply (one per workload: the best, which is what was timed
    beside the default), merged with those already in `destination` (the faster side-by-side time of a workload
    wins). The ledger keeps every workload `source` compared, so losers stay documented. Returns the number of
    records shipped.
    """
    source, destination = Path(source), Path(destination)
    winners: dict[str, tuple[list, list]] = {}  # workload key -> (workload line, best record)
    ledger_out: dict[str, dict] = {}
    for directory in (destination, source):
        best = _best_records(directory)
        for key, entry in load_ledger(directory).items():
            if "tuned_ms" not in entry:
                continue
            previous = ledger_out.get(key)
            if tuned_wins(entry) and key in best and (previous is None or not tuned_wins(previous)
                                                      or entry["tuned_ms"] < previous["tuned_ms"]):
                winners[key], ledger_out[key] = best[key], entry
            elif previous is None:
                ledger_out[key] = entry
    destination.mkdir(parents=True, exist_ok=True)
    keys = sorted(winners)
    write_atomic(destination / WORKLOADS, "".join(json.dumps(winners[k][0]) + "\n" for k in keys))
    write_atomic(destination / RECORDS, "".join(json.dumps([i, winners[k][1]]) + "\n" for i, k in enumerate(keys)))
    save_ledger(destination, ledger_out)
    return len(keys)
