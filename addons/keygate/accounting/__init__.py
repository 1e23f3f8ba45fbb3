"""The usage log and what is derived from it: the writer and reader of the JSONL lines, and
the ledger of per-key counters that quotas read."""
