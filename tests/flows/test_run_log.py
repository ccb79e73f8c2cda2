"""What a task's science code warns about, in a Dask worker process, reaches the flow run's log in the API (and the
UI), not only the worker's terminal."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.mark.usefixtures("prefect_server")
def test_a_warning_given_in_a_dask_worker_reaches_the_run_log() -> None:
    from prefect import flow, task
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.context import get_run_context

    from flows.runner import dask_task_runner
    from flows.tasks import run_isolated
    from pipeline.cluster import ClusterConfig

    def warn(message: str) -> int:
        logging.getLogger("pipeline.checks").warning(message)
        logging.getLogger("pipeline.checks").info("an info line stays on the worker")
        return 1

    @task
    def in_worker(message: str) -> int:
        return run_isolated(warn, message)

    @flow(name="relay-warnings")
    def relay(message: str) -> str:
        assert in_worker.submit(message).result() == 1
        return str(get_run_context().flow_run.id)

    message = "the brain's tissue touches the edge of the image"
    with dask_task_runner(ClusterConfig(workers=1)) as runner:
        run_id = relay.with_options(task_runner=runner)(message)
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
    relayed = [entry for entry in logs if message in entry.message]
    assert len(relayed) == 1 and relayed[0].level == logging.WARNING and relayed[0].task_run_id is not None, logs
    assert relayed[0].message == f"pipeline.checks: {message}"
    assert not any("info line" in entry.message for entry in logs)


@pytest.mark.usefixtures("prefect_server")
def test_a_subflows_warnings_reach_the_log_of_the_flow_run_above_it() -> None:
    """The batch flows run their items in a subflow (``align-items``) whose tasks run on Dask workers: the warnings
    given in that subflow and in its tasks reach the log of the flow run the user started too (once each, a task's
    named by its task run), where the UI shows them; a warning of the parent's own body reaches it as well."""
    from prefect import flow, task
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.context import get_run_context

    from flows.runner import dask_task_runner
    from flows.settings import project_logs_in_the_run
    from flows.tasks import run_isolated
    from pipeline.cluster import ClusterConfig

    def warn(message: str) -> int:
        logging.getLogger("pipeline.checks").warning(message)
        return 1

    @task(task_run_name="register {name}")
    def in_worker(name: str, message: str) -> int:
        return run_isolated(warn, message)

    @flow(name="items-subflow")
    def items(message: str) -> str:
        with project_logs_in_the_run():
            logging.getLogger("flows.steps").warning("item broken failed at convert")
            assert in_worker.submit("stp", message).result() == 1
        return str(get_run_context().flow_run.id)

    @flow(name="batch-parent")
    def parent(message: str) -> tuple[str, str]:
        with project_logs_in_the_run():
            logging.getLogger("pipeline.atlas").warning("the atlas's own warning")
            with dask_task_runner(ClusterConfig(workers=1)) as runner:
                sub_id = items.with_options(task_runner=runner)(message)
        return str(get_run_context().flow_run.id), sub_id

    message = "the brain's tissue touches the edge of the image"
    run_id, sub_id = parent(message)
    with get_client(sync_client=True) as client:
        ours = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
        subflow = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[sub_id])))
    warned = sorted(entry.message for entry in ours if entry.level == logging.WARNING)
    assert warned == [
        "item broken failed at convert", f"register stp: pipeline.checks: {message}", "the atlas's own warning"
    ], [(e.level, e.message) for e in ours]
    assert sum(message in entry.message for entry in subflow) == 1  # the subflow's own log keeps its copy


def _run_log(state: object) -> list:
    """Every entry of the log of the flow run that ended in ``state`` (its tasks' too), once all were sent."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()
    run_id = state.state_details.flow_run_id  # type: ignore[attr-defined]
    with get_client(sync_client=True) as client:
        return client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))


@pytest.mark.usefixtures("prefect_server")
def test_a_bad_input_shows_in_the_run_log_as_its_sentence_and_a_crash_with_its_traceback(tmp_path: Path) -> None:
    """A flow run that fails on bad input (a missing manifest; an empty brain refused by a convert task on a Dask
    worker) has the refusal's one sentence in its log, which users read in the UI, without Prefect's traceback, and
    still ends Failed; a real crash keeps its traceback there."""
    import numpy as np
    import tifffile
    from prefect import flow

    from flows.atlas_to_section import atlas_to_section
    from flows.runner import dask_task_runner
    from flows.tasks import convert_task
    from pipeline.cluster import ClusterConfig

    missing = tmp_path / "nowhere.yaml"
    state = atlas_to_section(str(EXAMPLES / "allen_mouse_100um_v1.2"), str(missing), str(tmp_path / "out"), return_state=True)
    sentence = f"manifest {missing} does not exist: give the path of a YAML or CSV manifest file."
    logs = _run_log(state)
    assert state.is_failed() and [e.message for e in logs if e.level >= logging.ERROR] == [sentence], logs
    assert not any("Traceback" in e.message for e in logs)

    empty = tmp_path / "empty.tif"
    tifffile.imwrite(empty, np.zeros((8, 20, 24), np.uint16))

    @flow(name="convert-an-empty-brain")
    def convert_empty() -> None:
        convert_task.submit(empty, tmp_path / "brain.ome.zarr", (50.0, 40.0, 40.0), None, "psl", False, "key").result()

    with dask_task_runner(ClusterConfig(workers=1)) as runner:
        state = convert_empty.with_options(task_runner=runner)(return_state=True)
    logs = _run_log(state)
    errors = [e for e in logs if e.level >= logging.ERROR]
    refused = [e.name for e in errors if e.message.startswith(f"image {empty} looks empty: its three mid-planes")]
    assert state.is_failed() and refused == ["prefect.task_runs", "prefect.flow_runs"], logs  # the task's, the flow's
    assert not any("Traceback" in e.message for e in logs)

    @flow(name="crash")
    def crash() -> None:
        raise RuntimeError("the disk went away")

    logs = _run_log(crash(return_state=True))
    assert any("Traceback" in e.message and "RuntimeError: the disk went away" in e.message for e in logs), logs


@pytest.mark.usefixtures("prefect_server")
def test_every_failed_item_is_named_in_the_run_log(
    flow_data: dict[str, Path], write_options: Callable[..., Path], tmp_path: Path
) -> None:
    """An item refused from its manifest entry (an invalid voxel size, a brain geometry the atlas cannot give) is named
    in the flow run's log as an item that failed at a step is, not only in the report: the run's final message names
    the first failed item only; the run's failure is that sentence, without Prefect's traceback."""
    from flows.atlas_to_section import atlas_to_section
    from flows.runner import BatchFailed

    manifest = tmp_path / "brains.csv"
    manifest.write_text(
        "name,path,voxel_size,orientation,brain_geometry\n"
        f"missing,{tmp_path / 'nowhere.tif'},200 200 200,psl,\n"
        f"two-numbers,{flow_data['brain_tif']},200 200,psl,\n"
        f"hemisphere,{flow_data['brain_tif']},200 200 200,psl,hemisphere_l\n"
    )
    options = write_options(tmp_path / "options.yaml", workers=1)
    state = atlas_to_section(
        str(flow_data["atlas"]), str(manifest), str(tmp_path / "out"), config=str(options), return_state=True
    )
    assert state.is_failed() and "3 of 3 items failed" in str(state.message), state.message
    logs = _run_log(state)
    warned = [entry.message for entry in logs if entry.level == logging.WARNING]
    for name, step in (("missing", "inputs"), ("two-numbers", "manifest"), ("hemisphere", "manifest")):
        assert sum(m.startswith(f"item {name} failed at {step}: InputError: ") for m in warned) == 1, warned
    # a deployment's run raises the state's BatchFailed, which Prefect logs on the flow-run logger with its
    # traceback ("Engine execution exited with unexpected exception"): the log shows its sentence alone
    failure = state.result(raise_on_failure=False)
    assert isinstance(failure, BatchFailed)
    shown: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: shown.append(logging.Formatter().format(record))  # type: ignore[method-assign]
    run_logger = logging.getLogger("prefect.flow_runs")
    run_logger.addHandler(handler)
    try:
        try:
            raise failure
        except BatchFailed:
            with warnings.catch_warnings():  # outside a run, Prefect's API handler warns that it sends nothing
                warnings.simplefilter("ignore", UserWarning)
                run_logger.error("Engine execution exited with unexpected exception", exc_info=True)
    finally:
        run_logger.removeHandler(handler)
    assert shown == [str(failure)] and "3 of 3 items failed" in shown[0], shown
