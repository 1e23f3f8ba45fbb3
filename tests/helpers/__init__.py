"""What keygate's tests share and what is run beside them; no tests here (pytest collects
only tests/test_*.py, and imports these as `helpers.<module>`; the fixtures stay in
tests/conftest.py, where pytest looks for them).

- `unit`: for the unit tests of the stages: a `Config` whose state comes straight from
  `parse_settings` and `parse_keys`, without files (`make_config`), keys and their secrets
  (`secret_of`), reverse-mode test flows (`make_flow`), the request hooks called in
  mitmproxy's order (`run_request`), a flow's `RequestState` set as the stages before the
  one under test would have (`with_state`).
- `hostile`: for the hostile-input and fault end-to-end tests (test_e2e_hostile.py,
  test_e2e_faults.py, test_e2e_edge.py): raw HTTP/1.1 and HTTP/2 clients that put bytes on
  the wire exactly as given, a follower of the usage log, and the invariants every exchange
  with keygate must keep, stated independently of keygate's code.
- `perf_ledger`: run by hand, not by pytest
  (`.venv/bin/python tests/helpers/perf_ledger.py`): how long a start-up spends rebuilding
  the quota counters from a big usage log.
"""
