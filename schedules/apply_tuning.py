"""Applying tuning databases at build time: each kernel with a record that beat the default schedule gets it.

Reading a database is not tuning: the build (schedules.lowering) needs only this, the tuner (schedules.tune)
writes the records and the ledger this reads (schedules.database).
"""

from __future__ import annotations

from pathlib import Path

from . import database as dbs


def workload_module(func):
    """The IRModule MetaSchedule stores a PrimFunc's workload as (the key of tuning records)."""
    import tvm

    return tvm.IRModule({"main": func.with_attr("global_symbol", "main")})


def workload_key(func) -> str:
    import tvm_ffi

    return str(tvm_ffi.structural_hash(workload_module(func)))


def tuned_schedules(directories: list[Path], target, applied: list | None = None):
    """Module pass: give each unscheduled PrimFunc the best tuned schedule that beats edgeq's default.

    A record is used only where its ledger says it beat the default side by side (`dbs.tuned_wins`); for a
    workload in several databases the fastest wins. Every other function keeps the default schedule.
    The names of the functions that got a tuned schedule are appended to `applied` (for the manifest).
    """
    import tvm
    from tvm import tirx

    opened = []
    for directory in directories:
        database, _ = dbs.open_database(directory, create=False)
        opened.append((database, dbs.load_ledger(directory)))

    @tvm.transform.module_pass(opt_level=0, name="EdgeqApplyTuningDatabase")
    def _apply(mod, _ctx):
        updates = {}
        for gvar, func in mod.functions.items():
            if not isinstance(func, tirx.PrimFunc) or func.attrs.get("tirx.is_scheduled", False):
                continue
            workload, key = workload_module(func), workload_key(func)
            best = None
            for database, ledger in opened:
                entry = ledger.get(key, {})
                if not dbs.tuned_wins(entry) or database.query_tuning_record(workload, target, "main") is None:
                    continue
                if best is None or entry["tuned_ms"] < best[0]:
                    best = (entry["tuned_ms"], database)
            if best is None:
                continue
            tuned = best[1].query_schedule(workload, target, "main").mod["main"]
            symbol = func.attrs.get("global_symbol") if func.attrs is not None else None
            tuned = tuned.with_attr("global_symbol", symbol) if symbol else tuned.without_attr("global_symbol")
            updates[gvar] = tuned.with_attr("tirx.is_scheduled", True)
        if applied is not None:
            applied.extend(sorted(gvar.name_hint for gvar in updates))
        for gvar, func in updates.items():
            mod[gvar] = func
        return mod

    return _apply
