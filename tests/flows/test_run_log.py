"""What a task's science code warns about, in a Dask worker process, reaches the flow run's log in the API (and the
UI), not only the worker's terminal."""

from __future__ import annotations

import logging

import pytest


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
