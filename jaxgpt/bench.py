"""`python -m jaxgpt.bench`: benchmarks printing JSON (the code: jaxgpt/perf/bench.py)."""
from jaxgpt.perf.bench import main

if __name__ == "__main__":
    main()
