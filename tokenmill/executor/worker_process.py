"""A tensor-parallel worker process: rank r of N, started by `TensorParallelExecutor`.

    python -m tokenmill.executor.worker_process --rank R --world-size N --store PATH \
        --driver-addr ipc://... --report-addr ipc://... --parent-pid PID

It rebuilds the engine config from the driver's EngineArgs, builds its shard of the model, sizes
and allocates its KV pool and captures its CUDA graphs in the same order as the driver (the
collectives in those steps pair up), then runs every WorkerStep it receives until WorkerShutdown.
It exits as soon as the driver's process goes away (`utils/process.watch_parent`).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading

import msgspec
import zmq

from tokenmill.utils.process import freeze_long_lived_objects, watch_parent

from tokenmill.executor.messages import (
    DriverMessage,
    WorkerFailed,
    WorkerInit,
    WorkerReady,
    WorkerReply,
    WorkerShutdown,
    WorkerStep,
)
from tokenmill.worker.control import WORKER_CALL_TYPES

logger = logging.getLogger("tokenmill.executor.worker_process")



def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--store", required=True)
    parser.add_argument("--driver-addr", required=True)
    parser.add_argument("--report-addr", required=True)
    parser.add_argument("--parent-pid", type=int, required=True)
    args = parser.parse_args(argv)
    threading.Thread(target=watch_parent, args=(args.parent_pid,), daemon=True, name="parent-watch").start()
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s [rank {args.rank}] %(message)s")

    ctx = zmq.Context()
    report = ctx.socket(zmq.PUSH)
    report.setsockopt(zmq.LINGER, 2000)
    report.connect(args.report_addr)
    inbox = ctx.socket(zmq.PULL)
    inbox.connect(args.driver_addr)
    try:
        run_worker(args, inbox, report)
        code = 0
    except Exception as exc:  # noqa: BLE001 - reported to the driver, then this rank exits non-zero
        logger.exception("rank %d failed", args.rank)
        report.send(msgspec.msgpack.encode(WorkerFailed(rank=args.rank, message=f"{type(exc).__name__}: {exc}")))
        code = 1
    report.close()
    inbox.close(linger=0)
    ctx.term()
    return code


def _recv(inbox: zmq.Socket, decoder: msgspec.msgpack.Decoder):
    """The driver's next message (if the driver's process dies meanwhile, `watch_parent` ends
    this one)."""
    return decoder.decode(inbox.recv(copy=False).buffer)


def run_worker(args: argparse.Namespace, inbox: zmq.Socket, report: zmq.Socket) -> None:
    import torch

    from tokenmill.config import EngineArgs
    from tokenmill.distributed.parallel_state import init_tensor_parallel
    from tokenmill.worker.worker import make_worker

    decoder = msgspec.msgpack.Decoder(DriverMessage)
    init = _recv(inbox, decoder)
    if not isinstance(init, WorkerInit):
        return
    engine_args = msgspec.msgpack.decode(init.engine_args_msgpack, type=EngineArgs)
    if engine_args.device in ("auto", "cuda") and torch.cuda.is_available():
        torch.cuda.set_device(args.rank)  # before anything touches CUDA, so GPU 0 gets no context
    config = engine_args.create_engine_config()
    if config.device.type == "cpu" and init.num_threads:
        torch.set_num_threads(init.num_threads)
    report.send(msgspec.msgpack.encode(WorkerReady(rank=args.rank, pid=os.getpid())))

    tp = init_tensor_parallel(args.rank, args.world_size, config.device, args.store, config.kernels,
                              config.model.dtype)
    worker = make_worker(config, tp)
    worker.initialize_kv_cache(worker.determine_num_blocks())
    freeze_long_lived_objects()
    logger.info("rank %d ready: %d KV blocks", args.rank, worker.num_blocks)
    while True:
        msg = _recv(inbox, decoder)
        if isinstance(msg, WorkerShutdown):
            break
        if isinstance(msg, WorkerStep):
            worker.append_sampled_tokens(msg.sampled_token_ids)
            worker.execute(msg.scheduler_output)
        elif isinstance(msg, WORKER_CALL_TYPES):
            report.send(msgspec.msgpack.encode(_run_call(worker, msg, args.rank)))
    worker.shutdown()
    tp.destroy()


def _run_call(worker, call, rank: int) -> WorkerReply:
    """A control call's outcome for the driver; an error is reported, not fatal (every rank
    fails the same way on a bad argument, and the engine carries on)."""
    try:
        result = worker.handle(call)
        return WorkerReply(rank, True, result=b"" if result is None else msgspec.msgpack.encode(result))
    except Exception as exc:  # noqa: BLE001 - reported to the driver
        logger.exception("rank %d: %s failed", rank, type(call).__name__)
        return WorkerReply(rank, False, error=f"{type(exc).__name__}: {exc}")


if __name__ == "__main__":
    sys.exit(main())
