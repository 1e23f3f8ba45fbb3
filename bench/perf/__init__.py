"""scripts/bench's measurements (bench/run.py runs them), one module per part:

  common.py          paths, the requests sent, BenchError, say()
  stats.py           median() and rnd() of what is measured
  profiles.py        the full and the quick run's counts and durations
  procs.py           the child processes, and their CPU time from /proc
  tools.py           wrk (and valgrind for bench/instructions.py), installed with apt-get
  loader.py          the load processes: wrk or bench/load.py
  fixtures.py        the keygate configuration: 10,000 keys, three channels
  contenders.py      the upstream and the proxies measured, and how each is started
  phases.py          Bench: what the phases share, run in order, and the run's meta
  small_requests.py  phase 1: throughput, latency and CPU; keygate's hooks timed (1b)
  streams.py         phase 2: streams at concurrency 1 and 100
  slow_streams.py    phase 3: many concurrent slow streams, peak memory
  keys.py            phase 4: 10,000 keys vs 1, reloading keys.yaml
  startup.py         phase 5: start-up with a big usage log
  targets.py         the targets (docs/performance.md) and their verdicts, the machine's scale
  report.py          the tables printed on stdout
  json_output.py     the results as JSON (--json FILE)
"""
