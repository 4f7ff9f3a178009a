"""One error type per package area; the CLI turns each into one line and exit code 2.

Every message names the module/node, says what went wrong and what to do.
"""


class PartitionerError(Exception):
    """Base class of every error the project raises on purpose."""


class CaptureError(PartitionerError):
    """The model could not be turned into a graph (partitioner/passes/capture.py)."""


class CostModelError(PartitionerError):
    """A cost could not be computed (partitioner/cost_models/)."""


class PlanError(PartitionerError):
    """No valid plan: too many stages, a memory cap nothing fits, bad options."""


class ScheduleError(PartitionerError):
    """A schedule cannot be generated or is invalid (partitioner/runtime/schedules.py)."""


class RuntimeConfigError(PartitionerError):
    """The distributed set-up or the inputs do not match the plan (partitioner/runtime/, api)."""
