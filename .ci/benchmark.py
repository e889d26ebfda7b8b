"""Training speed of any method file, without training: img/s, GFLOP per image, TFLOP/s, MFU and peak memory of its
training step on a synthetic batch already on the device; with --data-pipeline, the input pipeline instead (the
loader's img/s with --num-workers workers, then the device side of the views on those batches). Every flag after the
method's name goes to the method file, so any recipe, model, batch size, device, --amp or --compile can be timed:

    python .ci/benchmark.py mae --recipe imagenet            # MAE ViT-B/16 at 224 px, batch 256 (bf16, compiled on CUDA)
    python .ci/benchmark.py moco --device cpu                # the CPU recipe: fp32 and bf16, eager and compiled
    python .ci/benchmark.py msn --data imagenet/ --data-pipeline --num-workers 16

It runs the method's own train() up to prepare(), where the model, the optimizer and the training step on a
synthetic batch exist (the step the CPU probe times), measures there and stops: what is timed is the training code
itself. --amp / --compile left at auto on the CPU time all four choices, each against the first (fp32, eager).
--data defaults to 'fake' here (no download; the step's batch is synthetic anyway).
"""
import argparse
import importlib
import itertools
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
METHODS = ("mae", "msn", "cmae", "conmim", "simsiam", "moco", "grafting")


class Measured(Exception):
    """Raised from the method's prepare() to stop its train() once the measurement is done."""


def step_benchmark(m, model, args, device, step, steps, peak_tflops):
    """img/s of step(train_model) after 10 warm-up steps (compilation included), per choice of bf16 and compile."""
    from torch.utils.flop_counter import FlopCounterMode
    choices = [(amp, compiled) for amp in ([False, True] if args.amp is None else [args.amp])
               for compiled in ([False, True] if args.compile is None else [args.compile])]
    args.amp = choices[0][0]
    with FlopCounterMode(display=False) as counter:
        step(model)
    flops, name = counter.get_total_flops(), torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    first, results = None, []
    for args.amp, args.compile in choices:
        train_model = torch.nn.parallel.DistributedDataParallel(model) if m.WORLD > 1 else model
        train_model = torch.compile(train_model) if args.compile else train_model
        m.timed(lambda: step(train_model), 10, device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        seconds = m.timed(lambda: step(train_model), steps, device)
        first = first or seconds
        peak = peak_tflops or measure_peak_tflops(m, device, torch.bfloat16 if args.amp else torch.float32)
        mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        r = {"method": m.METHOD, "device": name, "torch": torch.__version__, "model": args.model_dims or args.model,
             "img_size": args.img_size, "patch_size": args.patch_size, "batch_size": args.batch_size, "amp_bf16": args.amp,
             "compile": args.compile, "img_per_s": args.batch_size / seconds, "ms_per_step": 1000 * seconds,
             "speedup": first / seconds, "gflop_per_img": flops / args.batch_size / 1e9, "tflops": flops / seconds / 1e12,
             "peak_tflops": peak, "mfu": flops / seconds / 1e12 / peak, "peak_mem_gib": mem}
        print(f"benchmark | {name} | torch {torch.__version__} | {r['model']}/{args.patch_size} at {args.img_size} px | "
              f"batch {args.batch_size} | bf16 {args.amp} | compile {args.compile}\nbenchmark | {r['img_per_s']:,.0f} img/s "
              f"({r['speedup']:.2f}x the first) | {r['ms_per_step']:.1f} ms/step | {r['gflop_per_img']:.3g} GFLOP/img "
              f"(fwd+bwd) | {r['tflops']:.3g} TFLOP/s | MFU {100 * r['mfu']:.1f}% of {peak:.3g} TFLOP/s | peak memory "
              f"{'n/a' if mem is None else f'{mem:.2f} GiB'}")
        print(json.dumps(r), flush=True)
        results.append(r)
    return results


def measure_peak_tflops(m, device, dtype):
    """Peak matmul throughput of this device in the training dtype (8192^3 matmuls on CUDA, 1024^3 on the CPU)."""
    n, reps = (8192, 20) if device.type == "cuda" else (1024, 5)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    m.timed(lambda: a @ b, 3, device)  # warm-up
    return 2 * n**3 / m.timed(lambda: a @ b, reps, device) / 1e12


def data_benchmark(m, run, args, device, steps):
    """The loader's img/s (decode, crops, flips, colour parameters) over `steps` batches after the first, then the
    device side (the method's device_views) on those batches."""
    def endless():  # as many epochs as it takes: a small folder holds only a few batches
        for epoch in itertools.count():
            run.sampler.set_epoch(epoch)
            yield from (batch[0] for batch in run.loader)  # the views; the labels are not used
    batches, cpu_side = endless(), []
    next(batches)  # start-up: the workers' first batch
    loader_s = m.timed(lambda: cpu_side.append(next(batches)), steps, torch.device("cpu"))
    on_device = iter([m.to_device(b, device) for b in cpu_side])
    device_s = m.timed(lambda: m.device_views(next(on_device), args), steps, device)
    r = {"method": m.METHOD, "data": args.data, "img_size": args.img_size, "batch_size": args.batch_size,
         "num_workers": args.num_workers, "loader_img_per_s": args.batch_size / loader_s,
         "loader_img_per_s_per_worker": args.batch_size / loader_s / max(args.num_workers, 1), "device": str(device),
         "device_views_img_per_s": args.batch_size / device_s, "device_views_ms_per_batch": 1000 * device_s}
    print(f"benchmark-data | {args.data} at {args.img_size} px | batch {args.batch_size} | {args.num_workers} workers\n"
          f"benchmark-data | loader (CPU side) {r['loader_img_per_s']:,.0f} img/s = {r['loader_img_per_s_per_worker']:,.0f} "
          f"per worker | device side ({device}) {r['device_views_img_per_s']:,.0f} img/s, "
          f"{r['device_views_ms_per_batch']:.1f} ms per batch")
    print(json.dumps(r), flush=True)
    return [r]


def benchmark(argv=None):
    """Parse the command line, run the method's train() up to prepare() and measure there; returns the results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                     epilog="Every other flag goes to the method file (its --help lists them).")
    parser.add_argument("method", choices=METHODS)
    parser.add_argument("--steps", type=int, default=30, help="timed steps, or batches with --data-pipeline (30)")
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="the device's peak for MFU; 0 measures it")
    parser.add_argument("--data-pipeline", action="store_true", help="time the input pipeline instead of the step")
    ours, rest = parser.parse_known_args(argv)
    m = importlib.import_module(ours.method)
    args = m.parse_args(rest if "--data" in rest else ["--data", "fake", *rest])
    runs, make_run, real_prepare = [], m.Run, m.prepare

    def keep_run(*a, **k):  # the run's data and loader, for --data-pipeline
        runs.append(make_run(*a, **k))
        return runs[-1]

    def measure(model, optimizer, args, device, lr, step, total_steps=0):
        if ours.data_pipeline:
            raise Measured(data_benchmark(m, runs[-1], args, device, ours.steps))
        raise Measured(step_benchmark(m, model, args, device, step, ours.steps, ours.peak_tflops))
    m.Run, m.prepare = keep_run, measure
    try:
        m.train(args)
    except Measured as done:
        return done.args[0]
    finally:
        m.Run, m.prepare = make_run, real_prepare


if __name__ == "__main__":
    module = importlib.import_module(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1] in METHODS else None
    if module:  # the method file's own one-line errors, Ctrl-C and closed-pipe handling
        module.main(benchmark)
    else:
        benchmark()
