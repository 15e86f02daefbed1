"""The audit of a training script the project did not write: does the optimizer receive the same
gradient however the same global batch is split into W ranks x A micro-steps x b items?

- ``probe.py``: loaded into the user's ranks (torch and the standard library only);
- ``runner.py``: one launch per layout, the records read back, ``audit()``;
- ``compare.py``: factors, direction errors, fitted exponents, absolute c, the verdict;
- ``result.py``: ``AuditResult``; ``report.py``: the table, the JSON, the figure;
- ``command.py``: ``ddp-reduce audit``.
"""
