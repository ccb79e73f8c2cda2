"""The flows' Dask task runner (local cluster or SLURM, from one config), the end-of-run report and the
flow run's final state (:func:`final_state`: ``Failed`` when any item failed, with the report kept)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

from prefect import flow
from prefect.client.schemas.objects import State
from prefect.states import Failed
from prefect_dask import DaskTaskRunner

from flows.artifacts import publish, write_report
from flows.config import StepOptions, cluster_config
from flows.records import ItemError, Outcomes, RunReport
from flows.settings import project_logs_in_the_run
from flows.steps import ItemJob, missing_inputs, run_jobs, split_finished
from pipeline.cluster import ClusterConfig, open_client
from pipeline.resume import atomic_write, output_lock

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def dask_task_runner(config: ClusterConfig) -> Iterator[DaskTaskRunner]:
    """A ``DaskTaskRunner`` connected to the cluster ``config`` describes; the cluster closes on exit.

    The same flow code runs on a ``LocalCluster`` (``kind: local``), on SLURM jobs through dask-jobqueue
    (``kind: slurm``, ``configs/cluster/slurm.yaml``) or on a running scheduler (``kind: address``):
    :func:`pipeline.cluster.open_client` starts (and stops) it, the runner connects by address.
    """
    with open_client(config) as (client, info):
        logger.info("tasks run on a %s Dask cluster (%d workers) %s", info.kind, info.workers, info.dashboard)
        yield DaskTaskRunner(address=client.scheduler.address)


@flow(name="align-items")
def align_items(jobs: list[ItemJob], options: StepOptions, max_parallel: int) -> Outcomes:
    """Subflow: the jobs on this flow's task runner (set by :func:`run_on_dask`); see :func:`flows.steps.run_jobs`.
    Its items' failures and warnings go to the run's log (:func:`flows.settings.project_logs_in_the_run`)."""
    with project_logs_in_the_run():
        results, errors = run_jobs(jobs, options, max_parallel)
    return Outcomes(results=results, errors=errors)


def run_on_dask(
    jobs: list[ItemJob], options: StepOptions, max_parallel: int, errors: list[ItemError]
) -> Outcomes:
    """Skip finished jobs, run the rest as the :func:`align_items` subflow on the configured Dask cluster.

    Jobs with a missing input path fail at once (step ``inputs``) and finished jobs are skipped, both
    before any cluster starts.

    Args:
        jobs: all jobs of the run.
        options: the flow's options (``options.cluster`` says where the tasks run).
        max_parallel: jobs in flight at once.
        errors: errors found before any job ran (e.g. invalid manifest entries), reported first.
    """
    present, absent = missing_inputs(jobs)
    finished, todo = split_finished(present, options)
    outcomes = Outcomes(results=finished, errors=[*errors, *absent])
    if not todo:
        return outcomes
    with dask_task_runner(cluster_config(options)) as runner:
        ran = align_items.with_options(task_runner=runner)(todo, options, max_parallel)
    return Outcomes(results=[*outcomes.results, *ran.results], errors=[*outcomes.errors, *ran.errors])


def _with_earlier_items(out: Path, outcomes: Outcomes) -> Outcomes:
    """This run's outcomes, then the outcomes that the folder's ``report.json`` holds for items this run did not
    touch (another manifest's items, run before or beside this one)."""
    try:
        earlier = RunReport.model_validate_json((out / "report.json").read_text())
    except (OSError, ValueError):  # none yet, or not one this version reads
        return outcomes
    touched = {r.name for r in outcomes.results} | {e.name for e in outcomes.errors}
    return Outcomes(
        results=[*outcomes.results, *(r for r in earlier.results if r.name not in touched)],
        errors=[*outcomes.errors, *(e for e in earlier.errors if e.name not in touched)],
    )


class BatchFailed(RuntimeError):
    """Some items of a flow run failed; the run's report (also in ``<out>/report.json``) is attached.

    Attributes:
        report: the :class:`~flows.records.RunReport` of the run (results and errors).
    """

    def __init__(self, message: str, report: RunReport) -> None:
        super().__init__(message)
        self.report = report

    def __reduce__(self) -> tuple[type, tuple[str, RunReport]]:
        return type(self), (str(self), self.report)


def failure_summary(report: RunReport) -> str:
    """One sentence: how many items failed, and the first failure's item, step and reason."""
    first = report.errors[0]
    total = len(report.errors) + len(report.results)
    return (
        f"{report.flow}: {len(report.errors)} of {total} items failed (first: {first.name!r} at {first.step}: "
        f"{first.message.rstrip('.')}); the others finished, see {report.report or report.out}."
    )


def final_state(report: RunReport) -> RunReport | State:
    """What a flow returns: its report when every item succeeded, else a ``Failed`` state whose message is
    :func:`failure_summary` and whose data is :class:`BatchFailed` holding the report (a direct call of the
    flow raises it; ``return_state=True`` gives the state)."""
    if not report.errors:
        return report
    message = failure_summary(report)
    return Failed(message=message, data=BatchFailed(message, report))


def finish_run(flow: str, inputs: dict[str, str], out: Path, outcomes: Outcomes) -> RunReport:
    """Write ``report.md`` and ``report.json`` into ``out`` and publish the Prefect artifacts. The files hold every
    item of the folder: this run's, then those an earlier run (or one running beside it) recorded there and this
    run did not touch (:func:`_with_earlier_items`). The report returned is this run's."""
    out.mkdir(parents=True, exist_ok=True)
    keys = publish(flow, outcomes.results, outcomes.errors)
    with output_lock(out / "report.json", wait=True):  # two runs into one folder: one writes after the other
        folder = _with_earlier_items(out, outcomes)
        report_md = write_report(
            out, f"{flow}: {len(folder.results)} aligned, {len(folder.errors)} failed", folder.results, folder.errors
        )
        report = RunReport(
            flow=flow, inputs=inputs, out=out, results=outcomes.results, errors=outcomes.errors, report=report_md,
            artifacts=keys,
        )  # fmt: skip
        text = report.model_copy(update={"results": folder.results, "errors": folder.errors}).model_dump_json(indent=1)
        atomic_write(out / "report.json", lambda handle: handle.write(text.encode()))
    logger.info(
        "%s: %d done, %d skipped, %d failed; report %s",
        flow,
        report.n_done,
        report.n_skipped,
        len(report.errors),
        report_md,
    )
    return report
