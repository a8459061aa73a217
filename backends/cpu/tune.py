"""MetaSchedule tuning for the cpu target (`r1c tune`) and the tuning database that `r1c compile` applies.

The database is MetaSchedule's JSON database in one directory per target (default
`$R1C_TUNE_DIR/<kind>-<mcpu>`, `~/.cache/r1c/tune/...`). Records are keyed by the structure of each PrimFunc, so a
record serves every model that has the same kernel at the same shapes. Tuning needs static shapes: tune and
compile with the same `shapes` binding.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import tvm
import tvm_ffi
from tvm import tirx as tir
from tvm.s_tir import meta_schedule as ms


def default_dir(target: dict[str, Any]) -> str:
    root = Path(os.environ.get("R1C_TUNE_DIR") or Path.home() / ".cache" / "r1c" / "tune")
    return str(root / f"{target['kind']}-{target.get('mcpu') or target.get('mtriple')}")


def open_database(work_dir: str) -> ms.database.JSONDatabase:
    Path(work_dir).mkdir(parents=True, exist_ok=True)
    return ms.database.JSONDatabase(
        path_workload=str(Path(work_dir) / "database_workload.json"),
        path_tuning_record=str(Path(work_dir) / "database_tuning_record.json"),
        module_equality="structural",
    )


def apply_database(mod: tvm.IRModule, target: tvm.target.Target, work_dir: str) -> tuple[tvm.IRModule, list[str]]:
    """Replace every PrimFunc the database has a record for by its tuned schedule; (module, the names replaced)."""
    if not (Path(work_dir) / "database_tuning_record.json").exists():
        return mod, []
    db = open_database(work_dir)
    rejected = set(_report(work_dir).get("rejected", []))
    tuned = []
    for gv, func in list(mod.functions_items()):
        if not isinstance(func, tir.PrimFunc):
            continue
        func = func.with_attr("global_symbol", "main")  # as MetaSchedule's task extraction names a workload
        if str(tvm_ffi.structural_hash(func)) in rejected:
            continue
        with target:
            sch = db.query_schedule(tvm.IRModule({"main": func}), target, gv.name_hint)
        if sch is not None:
            mod[gv] = sch.mod["main"].without_attr("global_symbol").with_attr("tir.is_scheduled", True)
            tuned.append(gv.name_hint)
    return mod, tuned


REPORT_FILE = "r1c_tuning_report.json"  # per kernel: default-schedule and tuned times; rejected records


def _report(work_dir: str) -> dict:
    import json

    path = Path(work_dir) / REPORT_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def tune(mod: tvm.IRModule, target: tvm.target.Target, work_dir: str, trials: int, progress: Any = None) -> dict:
    """Tune every kernel of `mod` (fused, unscheduled, static shapes) with MetaSchedule, `trials` measurements in
    all, into the database at work_dir. Then time each kernel's best record against its default schedule and
    keep the record only where it is faster: compile then never gets a slower kernel from tuning."""
    from tvm.s_tir.meta_schedule import relax_integration as ri

    tasks = [t for t in ri.extract_tasks(mod, target) if _tunable(t.dispatched[0]["main"])]
    dynamic = [t.task_name for t in tasks if not _static(t.dispatched[0]["main"])]
    if dynamic:
        raise ValueError(
            f"tuning needs static shapes; {len(dynamic)} kernels have symbolic dims (e.g. {dynamic[0]}): "
            "bind them with the `shapes` option (r1c tune --shapes B=1,S=128)"
        )
    if not tasks:
        return {"kernels": {}}
    # MetaSchedule's console handler takes this logger's level: its per-round tables go to work_dir/logs only
    logging.getLogger("tvm.s_tir.meta_schedule").setLevel(logging.WARNING)
    # MetaSchedule's default search (a population of 512 per round) costs about a minute per kernel and round on
    # two cores before anything is measured; a smaller population keeps a short run short
    strategy = ms.search_strategy.EvolutionarySearch(population_size=64, init_min_unmeasured=16, genetic_num_iters=2)
    contexts, weights = ri.extracted_tasks_to_tune_contexts(tasks, work_dir, strategy=strategy, seed=0)
    ms.tune.tune_tasks(
        tasks=contexts,
        task_weights=weights,
        work_dir=work_dir,
        max_trials_global=trials,
        max_trials_per_task=max(1, -(-trials // len(tasks))),
        num_trials_per_iter=min(64, max(1, -(-trials // len(tasks)))),
        builder=in_process_builder(),
        runner=ms.runner.LocalRunner(timeout_sec=60),
        measure_callbacks=[*ms.measure_callback.MeasureCallback.create("default"), *_progress(progress)],
    )
    return _compare(tasks, target, work_dir)


def in_process_builder() -> Any:
    """MetaSchedule's LocalBuilder starts a new process pool for every batch (a known leak, its source says);
    here that costs about 40 s per batch, for builds of a few milliseconds. This builder compiles in this
    process, with LocalBuilder's own build and export functions; the runner still measures in a worker."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.builder import local_builder

    @derived_object
    class InProcessBuilder(ms.builder.PyBuilder):
        def build(self, build_inputs: list) -> list:
            results = []
            for b in build_inputs:
                try:
                    path = local_builder.default_export(local_builder.default_build(b.mod, b.target, None))
                    results.append(ms.builder.BuilderResult(path, None))
                except Exception as e:  # a candidate the compiler rejects is a failed trial, not a failed run
                    results.append(ms.builder.BuilderResult(None, f"{type(e).__name__}: {e}"))
            return results

    return InProcessBuilder()


def _tunable(func: tir.PrimFunc) -> bool:
    """Kernels with a reduction (GEMMs, softmax, norms): where schedules differ. Hand-written kernels (routing,
    grouped GEMM) have no blocks for MetaSchedule's rules; copies and elementwise work gain too little for the
    measurements they would cost on a small machine."""
    from r1c.backends.cpu.kernels import KERNEL_ATTR
    from r1c.backends.cpu.schedule import HAND_WRITTEN

    if (func.attrs or {}).get(KERNEL_ATTR) in HAND_WRITTEN:
        return False
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    try:
        blocks, todo = [], [sch.get_sblock("root")]
    except s_tir.ScheduleError:  # an extern call (topk's sort): nothing to schedule
        return False
    while todo:
        children = sch.get_child_blocks(todo.pop())
        blocks.extend(children)
        todo.extend(children)
    return any(iv.iter_type == tir.IterVar.CommReduce for b in blocks for iv in sch.get(b).iter_vars)


def _static(func: tir.PrimFunc) -> bool:
    return all(isinstance(d, (int, tir.IntImm)) for p in func.params for d in p.ty.shape)


def _progress(progress: Any) -> list:
    if progress is None:
        return []
    from tvm.ir.utils import derived_object

    @derived_object
    class Progress(ms.measure_callback.PyMeasureCallback):
        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results) -> None:
            progress(len(measure_candidates))

    return [Progress()]


def _compare(tasks: list, target: tvm.target.Target, work_dir: str) -> dict:
    import json

    import numpy as np

    from r1c.backends.cpu.schedule import schedule_default

    db = open_database(work_dir)
    report = _report(work_dir)  # other models' kernels tuned into the same database stay
    kernels, rejected = report.get("kernels", {}), set(report.get("rejected", []))
    compared = []
    for t in tasks:
        func = t.dispatched[0]["main"]
        with target:
            sch = db.query_schedule(tvm.IRModule({"main": func}), target, t.task_name)
        if sch is None:
            continue
        default_ms = time_kernel(schedule_default(func, target), target, np.random.default_rng(0))
        tuned_ms = time_kernel(sch.mod["main"], target, np.random.default_rng(0))
        key = str(tvm_ffi.structural_hash(func))
        kernels[t.task_name] = {"default_ms": default_ms, "tuned_ms": tuned_ms, "calls": t.weight, "hash": key}
        compared.append(t.task_name)
        if tuned_ms >= default_ms:
            rejected.add(key)
        else:
            rejected.discard(key)
    report = {"kernels": kernels, "rejected": sorted(rejected)}
    (Path(work_dir) / REPORT_FILE).write_text(json.dumps(report, indent=1) + "\n")
    return report | {"this_model": compared}  # the database's report spans every model tuned into it


def time_kernel(func: tir.PrimFunc, target: tvm.target.Target, rng: Any, repeat: int = 5) -> float:
    """Median milliseconds of one call on random floats (integer inputs are zeros: always valid indices)."""
    import numpy as np

    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)
    args = []
    for p in func.params:
        shape, dtype = [int(d) for d in p.ty.shape], str(p.ty.dtype)
        if "float" in dtype:
            args.append(tvm.runtime.tensor(rng.standard_normal(shape).astype(dtype)))
        else:
            args.append(tvm.runtime.tensor(np.zeros(shape, dtype)))
    ev = lib.mod.time_evaluator("main", tvm.cpu(), number=max(1, 3), repeat=repeat)
    return float(ev(*args).median * 1e3)
