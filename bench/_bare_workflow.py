"""The bare baseline: a workflow that runs one activity (its own module, so the workflow
sandbox can import it; a ``__main__`` script cannot be re-imported there)."""

from __future__ import annotations

from datetime import timedelta

from temporalio import activity, workflow


@activity.defn(name="bench_noop")
async def noop(value: str) -> str:
    """The bare baseline's only activity."""
    return value


@workflow.defn(name="BenchBareWorkflow")
class BareWorkflow:
    """One activity, nothing else."""

    @workflow.run
    async def run(self, value: str) -> str:
        """Run the activity once."""
        return str(
            await workflow.execute_activity(
                "bench_noop", value, start_to_close_timeout=timedelta(seconds=30)
            )
        )
