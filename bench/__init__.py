"""Benchmark suite: `python -m bench` (see __main__.py), and `pytest bench` (test_bench.py).

Where things are:
  shapes.py               Shape, the reference shapes, the quick and full suites
  inputs.py               the tensors one shape's cases share: weights (Params, FamilyParams), x, a code
  oracle.py               the float64 references, tolerances, rel_err, CheckError
  checks_topk.py          the TopK selection rule and the checks of the TopK ops
  checks_threshold.py     the threshold rule and the checks of the families' ops and of every class's forward
  ops.py                  the registry: each op's setup, check and work model; case selection; build / check
  providers.py            the provider interface (and SAEProvider, the base of "ours")
  providers_topk.py       TopK providers: ours, dense, torch_sparse, chunked, sparsify
  providers_threshold.py  ReLU, JumpReLU, gated, BatchTopK providers and the other classes' forwards
  suite.py                runs a suite: ceilings, then per op each provider's check and memory, then timing
                          (CPU: the providers and the GEMM in interleaved rounds)
  measure.py              timing (interleaved rounds), memory, ceilings, device facts; report.py: table,
                          JSON, Markdown, plots
  targets.py              DESIGN's speed targets as data, and their table (the ratios judged in a run)
  largest.py              the largest n that trains (CUDA); tune.py: the GPU tile sweep (`make gpu-tune`)
  callgrind.py            one call of each C++ CPU kernel, for callgrind instruction counts
  testrun.py              pytest plugin for time-limited runs (`make gpu-test`): budget, JSON as it goes
"""
