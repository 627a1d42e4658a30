"""Op math and backends: one file per op (see each module's docstring)."""
