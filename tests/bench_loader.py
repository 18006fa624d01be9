"""Imports a benchmark script as a module (benchmarks/ is not a package), for the tests that run tiny modes."""
import importlib.util
import pathlib
import sys

BENCH_DIR = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str):
    if str(BENCH_DIR) not in sys.path:
        sys.path.insert(0, str(BENCH_DIR))  # the scripts import their sibling results_io
    spec = importlib.util.spec_from_file_location(name, BENCH_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
