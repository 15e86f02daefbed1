"""Analysis: converting settings between conventions, studies and their reports, benchmarks."""
