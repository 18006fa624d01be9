"""Issue 28's first token, by mechanism (benchmarks/bench_first_token.py measures the seconds): a second
`ef-jax generate` on the shipped model loads every program from the compilation cache (compiles none), the first
run needs few programs, and the generate path imports neither flax nor torch nor transformers.
(tests/test_tokenizer_fast.py checks the tokenizer alone imports no torch.)"""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# the console script's two lines; at exit, the heavy packages that were imported
LAUNCH = ("import atexit, sys; atexit.register(lambda: print('imported', sorted({m.split('.')[0] for m in sys.modules} "
          "& {'flax', 'torch', 'transformers', 'orbax', 'optax'}), file=sys.stderr)); "
          "from ef_jax.cli.commands import main; sys.exit(main())")
MAX_PROGRAMS = 10  # embed, head, 2 layer groups × (prefill, decode), KV cache, sample; was 25 (issue 28)


def _generate(cache: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}  # the CLI's own cache
    env.update(EF_JAX_CACHE_DIR=cache, PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", LAUNCH, "generate", "To be, or not", "--max-new-tokens", "3"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "imported []" in out.stderr, out.stderr
    return out.stdout


def test_second_generate_compiles_nothing_and_imports_no_flax_or_torch(tmp_path):
    jit = tmp_path / "jit"
    first = _generate(str(tmp_path))
    programs = sorted(os.listdir(jit))
    assert 0 < len(programs) <= MAX_PROGRAMS, programs
    assert _generate(str(tmp_path)) == first
    assert sorted(os.listdir(jit)) == programs  # nothing new was compiled (and so written)
