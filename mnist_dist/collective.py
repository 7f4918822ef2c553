"""Decisions every process of a job reaches together, so that none is left waiting at a collective."""
from __future__ import annotations

from .errors import UserError


def agree(accelerator, prepare) -> list:
    """Run ``prepare`` on every process and return every process's result, in rank order.

    If it raises a UserError on any process, every process raises one (the main process's error, else the
    first other process's, named by rank): all stop together, before any of them starts work that would
    leave the others waiting at a collective until it times out."""
    result, error = None, None
    try:
        result = prepare()
    except UserError as e:
        error = str(e)
    every = [(error, result)]
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        every = gather_object(every)
    for rank, (failure, _) in enumerate(every):
        if failure:
            raise UserError(failure if rank == 0 else f"process {rank}: {failure}")
    return [value for _, value in every]


def on_main_process(accelerator, check) -> None:
    """Run ``check`` on the main process alone; a UserError it raises is raised on every process, so that all
    of them stop together instead of waiting for the main one at the next collective."""
    error = None
    if accelerator.is_main_process:
        try:
            check()
        except UserError as e:
            error = str(e)
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        box = [error]
        broadcast_object_list(box)
        error = box[0]
    if error:
        raise UserError(error)
