"""Building blocks of the validate stage (evidence tables, leakage, drift, GX suite, reports).

Importing this package is cheap: Great Expectations is imported only inside
`gx_suite.run_suites` / `gx_suite.build_suites`.
"""
