"""Small all-reduces on one host's GPUs: NCCL against the one-shot symmetric-memory all-reduce.

    python3 -m tokenmill.benchmarks.kernels.all_reduce --world-size 2 [--output-json out.json]

One process per GPU (spawned here). For each message size (bf16 activations of a decode step):
1. correctness: both paths sum the same random tensors; checked against a float64 sum, and
   200 back-to-back sums of different data inside one CUDA graph are all checked (a buffer reused
   before a peer finished reading it would show here);
2. speed: microseconds per all-reduce, eagerly and replayed from a CUDA graph of 100 of them
   (the decode path), each path timed in the same run. Rank 0 prints the table.

Then the fused all-reduce + residual add + RMSNorm kernel (ops/all_reduce_rms_norm.py)
at decode shapes (rows x hidden): its outputs against the reference computed from every rank's
inputs, bit-identical across ranks, 200 calls on different data in one CUDA graph (alternating
slots, as the model calls it), and its time against the one-shot all-reduce followed by the
fused add + RMSNorm kernel it replaces, both replayed from CUDA graphs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

SIZES_KB = (16, 32, 64, 128, 256, 512)
FUSED_SHAPES = ((1, 4096), (1, 8192), (8, 8192), (32, 4096), (32, 8192))  # rows x hidden


def _time_us(fn, iters: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn()
    torch.cuda.synchronize()
    dist.barrier()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / iters


def _graph_of(fn, n: int) -> torch.cuda.CUDAGraph:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(n):
            fn()
    return graph


def _progress(rank: int, what: str) -> None:
    if rank == 0:
        print(f"[rank 0] {what}", flush=True)


def _gather(x: torch.Tensor, world: int) -> list[torch.Tensor]:
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    return parts


def _check_fused(rank: int, world: int, comm, device, failures: list[str]) -> list[dict]:
    """The fused all-reduce + add + RMSNorm: right, identical on every rank, and timed."""
    from tokenmill.ops.all_reduce_rms_norm import all_reduce_add_rms_norm, all_reduce_add_rms_norm_ref
    from tokenmill.ops.rms_norm import rms_norm

    if not comm.fuses_norm:
        failures.append("fused kernel not set up")
        return []

    def fused(x, residual, weight, eps, slot):
        return all_reduce_add_rms_norm(x, residual, weight, eps, comm.buffer_ptrs, comm.call_counters, slot,
                                       comm.fused_region_words, comm.rank, comm.world_size)
    results = []
    for rows, hidden in FUSED_SHAPES:
        gen = torch.Generator(device=device).manual_seed(7 * rows + hidden + 101 * rank)
        shared_gen = torch.Generator(device=device).manual_seed(rows + hidden)  # same on all ranks
        weight = (1 + 0.1 * torch.randn(hidden, device=device, generator=shared_gen)).bfloat16()
        k = 200
        xs = torch.randn(k, rows, hidden, device=device, dtype=torch.bfloat16, generator=gen)
        residuals = torch.randn(k, rows, hidden, device=device, dtype=torch.bfloat16, generator=shared_gen)
        all_xs = _gather(xs, world)
        name = f"fused {rows}x{hidden}"
        # Eager, slots alternating as the communicator assigns them; the last call with no residual.
        for i, slot in enumerate((0, 1, 0)):
            residual = residuals[slot] if i < 2 else None
            out, res = fused(xs[slot], residual, weight, 1e-5, slot)
            want_out, want_res = all_reduce_add_rms_norm_ref([a[slot] for a in all_xs], residual, weight, 1e-5)
            if not torch.equal(res, want_res):
                failures.append(f"{name} eager slot {slot}: residual differs from the reference")
            err = (out.float() - want_out.float()).abs().max().item()
            if err > 2 ** -7 * want_out.float().abs().max().item():
                failures.append(f"{name} eager slot {slot}: normed error {err:.3g}")
        # k calls on different data in one graph, slots 0 and 1 alternating as the communicator
        # assigns them; every ninth call with no residual to add.
        outs = torch.empty_like(xs)
        res_outs = torch.empty_like(xs)
        slots = [i % 2 for i in range(k)]
        no_residual = [i % 9 == 0 for i in range(k)]

        def calls():
            for i in range(k):
                residual = None if no_residual[i] else residuals[i]
                o, r = fused(xs[i], residual, weight, 1e-5, slots[i])
                outs[i].copy_(o)
                res_outs[i].copy_(r)
        graph = _graph_of(calls, 1)
        outs.zero_()
        graph.replay()
        torch.cuda.synchronize()
        want_out, want_res = torch.empty_like(xs), torch.empty_like(xs)
        for i in range(k):
            want_out[i], want_res[i] = all_reduce_add_rms_norm_ref(
                [a[i] for a in all_xs], None if no_residual[i] else residuals[i], weight, 1e-5)
        if not torch.equal(res_outs, want_res):
            bad = (res_outs != want_res).flatten(1).any(1).nonzero().flatten().tolist()
            failures.append(f"{name} graph: residual wrong in calls {bad[:10]}")
        err = (outs.float() - want_out.float()).abs().max().item()
        if err > 2 ** -7 * want_out.float().abs().max().item():
            failures.append(f"{name} graph: normed error {err:.3g}")
        for got, label in ((outs, "normed"), (res_outs, "residual")):
            if any(not torch.equal(p, got) for p in _gather(got, world)):
                failures.append(f"{name} graph: {label} output differs between ranks")
        _progress(rank, f"{name}: checked (normed error {err:.3g})")
        # Speed: 100 back to back, replayed from a graph, against one-shot + add/norm.
        x, residual = xs[0].clone(), residuals[0].clone()

        y = x.clone()

        def unfused():  # in place, as on a projection's output (values grow; timing does not care)
            comm.all_reduce_(y)
            rms_norm(y, weight, 1e-5, residual)

        def fused_pair():
            fused(x, residual, weight, 1e-5, 0)
            fused(x, residual, weight, 1e-5, 1)
        g_unfused = _graph_of(unfused, 100)
        g_fused = _graph_of(fused_pair, 50)
        unfused_us = _time_us(g_unfused.replay, 10) / 100
        fused_us = _time_us(g_fused.replay, 10) / 100
        results.append({"rows": rows, "hidden": hidden, "unfused_graph_us": unfused_us,
                        "fused_graph_us": fused_us, "max_err_normed": err})
    return results


def _worker(rank: int, world: int, store: str, out_path: str | None, hang_dump_s: float) -> None:
    import faulthandler
    faulthandler.dump_traceback_later(hang_dump_s, exit=True)
    sys.path.insert(0, os.getcwd())
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"file://{store}", rank=rank, world_size=world)
    from tokenmill.distributed import symm_mem as sm

    device = torch.device("cuda", rank)
    ok = sm.locally_supported(device, world)
    _progress(rank, f"process group up; locally supported: {ok}")
    # The fused kernel is set up whatever the engine's policy (fused_all_reduce_max_world_size), to time it.
    comm = sm.SymmMemCommunicator(dist.group.WORLD.group_name, device, torch.bfloat16, fuse_norm=True) if ok else None
    _progress(rank, f"symmetric memory set up: {comm is not None}")
    if comm is None:
        raise SystemExit(f"rank {rank}: symmetric memory unavailable (locally_supported={ok})")
    rows, failures = [], []
    for kb in SIZES_KB:
        n = kb * 1024 // 2
        gen = torch.Generator(device=device).manual_seed(1000 * kb + rank)
        x = torch.randn(n, device=device, dtype=torch.bfloat16, generator=gen)
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x)
        exact = torch.stack([p.double() for p in parts]).sum(0)
        a, b = x.clone(), x.clone()
        dist.all_reduce(a)
        comm.all_reduce_(b)
        tol = 2 ** -7 * exact.abs().max().item() + 1e-2  # bf16 rounding of the sum
        err_nccl = (a.double() - exact).abs().max().item()
        err_symm = (b.double() - exact).abs().max().item()
        if err_symm > tol:
            failures.append(f"{kb} KB eager: error {err_symm:.3g} > {tol:.3g}")
        _progress(rank, f"{kb} KB eager sum done (error {err_symm:.3g})")
        # Many sums of different data back to back in one graph: each result must be right.
        k = 200
        inputs = torch.randn(k, n, device=device, dtype=torch.bfloat16, generator=gen)
        work = inputs.clone()
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize()
        with torch.cuda.graph(graph):
            for i in range(k):
                comm.all_reduce_(work[i])
        work.copy_(inputs)
        graph.replay()
        torch.cuda.synchronize()
        gathered = [torch.empty_like(inputs) for _ in range(world)]
        dist.all_gather(gathered, inputs)
        want = torch.stack([g.double() for g in gathered]).sum(0)
        err_graph = (work.double() - want).abs().max().item()
        if err_graph > 2 ** -7 * want.abs().max().item() + 1e-2:
            failures.append(f"{kb} KB graph: error {err_graph:.3g}")
        _progress(rank, f"{kb} KB graph sums done (error {err_graph:.3g})")
        y = x.clone()
        nccl_eager = _time_us(lambda: dist.all_reduce(y), 200)
        symm_eager = _time_us(lambda: comm.all_reduce_(y), 200)
        g_nccl = _graph_of(lambda: dist.all_reduce(y), 100)
        g_symm = _graph_of(lambda: comm.all_reduce_(y), 100)
        nccl_graph = _time_us(g_nccl.replay, 10) / 100
        symm_graph = _time_us(g_symm.replay, 10) / 100
        rows.append({"kb": kb, "nccl_eager_us": nccl_eager, "symm_eager_us": symm_eager,
                     "nccl_graph_us": nccl_graph, "symm_graph_us": symm_graph,
                     "max_err_nccl": err_nccl, "max_err_symm": err_symm, "max_err_symm_graph": err_graph})
    fused_rows = _check_fused(rank, world, comm, device, failures)
    all_failures = [None] * world
    dist.all_gather_object(all_failures, failures)
    if rank == 0:
        print(f"world size {world}, {torch.cuda.get_device_name(0)}, torch {torch.__version__}, "
              "one_shot_all_reduce_copy_out")
        print(f"{'KB':>5} {'NCCL eager':>11} {'symm eager':>11} {'NCCL graph':>11} {'symm graph':>11} {'graph ratio':>12}")
        for r in rows:
            print(f"{r['kb']:5d} {r['nccl_eager_us']:9.1f}us {r['symm_eager_us']:9.1f}us "
                  f"{r['nccl_graph_us']:9.1f}us {r['symm_graph_us']:9.1f}us "
                  f"{r['nccl_graph_us'] / r['symm_graph_us']:11.2f}x")
        print(f"{'rows x hidden':>14} {'one-shot + norm':>16} {'fused':>9} {'ratio':>7}")
        for r in fused_rows:
            print(f"{r['rows']:5d} x {r['hidden']:6d} {r['unfused_graph_us']:14.1f}us "
                  f"{r['fused_graph_us']:7.1f}us {r['unfused_graph_us'] / r['fused_graph_us']:6.2f}x")
        bad = [f for fs in all_failures for f in fs]
        print("correctness:", "all sums right" if not bad else "FAILED: " + "; ".join(bad))
        if out_path:
            with open(out_path, "w") as f:
                json.dump({"world_size": world, "rows": rows, "fused": fused_rows, "failures": bad}, f, indent=1)
    dist.barrier()
    torch.cuda.synchronize()
    # No process-group teardown: with this script's CUDA graphs of NCCL calls still alive, both
    # NCCL's orderly shutdown and its abort hung (2x H200). The engine drops its graphs first and
    # then aborts (parallel_state.destroy_tensor_parallel); a benchmark process can just exit.
    sys.stdout.flush()
    os._exit(1 if any(all_failures) else 0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world-size", type=int, default=torch.cuda.device_count())
    p.add_argument("--output-json", default=None)
    p.add_argument("--hang-dump-s", type=float, default=60,
                   help="a rank still running after this many seconds prints its stacks and exits")
    args = p.parse_args()
    store = os.path.join(tempfile.mkdtemp(prefix="tm_ar_"), "store")
    mp.spawn(_worker, args=(args.world_size, store, args.output_json, args.hang_dump_s),
             nprocs=args.world_size)


if __name__ == "__main__":
    main()
