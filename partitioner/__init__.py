"""partitioner: automatic pipeline-parallel compiler for PyTorch.

    from partitioner import compile_parallel
    pm = compile_parallel(model, devices=["cuda:0", "cuda:1"], example_inputs=(x,), loss_fn=loss_fn)
    loss = pm.train_step(x, target=y)
"""
from partitioner.errors import PartitionerError, CaptureError, PlanError, ScheduleError, RuntimeConfigError

__all__ = ["compile_parallel", "ParallelModel", "PartitionerError", "CaptureError", "PlanError",
           "ScheduleError", "RuntimeConfigError"]


def __getattr__(name):  # lazy: keep `import partitioner` light for the CLI
    if name == "compile_parallel":
        from partitioner.api import compile_parallel
        return compile_parallel
    if name == "ParallelModel":
        from partitioner.parallel_model import ParallelModel
        return ParallelModel
    raise AttributeError(name)
