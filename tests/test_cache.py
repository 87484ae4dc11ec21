"""XLA's persistent compilation cache: on by default, movable, off on request."""

import os
import subprocess
import sys
from pathlib import Path

from flexmerge_jax import _cache

ROOT = Path(__file__).resolve().parents[1]


def test_cache_directory_from_the_environment(tmp_path):
    home = os.path.expanduser("~")
    assert _cache.cache_dir({}) == Path(home) / ".cache" / "flexmerge_jax" / "xla"
    assert _cache.cache_dir({"XDG_CACHE_HOME": str(tmp_path)}) == tmp_path / "flexmerge_jax" / "xla"
    assert _cache.cache_dir({_cache.ENV: str(tmp_path / "x"), "XDG_CACHE_HOME": "/y"}) == \
        tmp_path / "x"
    for off in ("0", "off", "OFF", "false", "no"):
        assert _cache.cache_dir({_cache.ENV: off}) is None


def _run(code: str, **env_changes) -> str:
    env = {k: v for k, v in os.environ.items()
           if k not in (_cache.ENV, "JAX_COMPILATION_CACHE_DIR")}
    env.update(env_changes)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().splitlines()[-1]


def test_importing_the_library_turns_the_cache_on(tmp_path):
    """By default, in a new process, without any setting, programs land in
    the user cache directory."""
    code = ("import jax, flexmerge_jax; jax.jit(lambda x: x * 3 + 1)(1.0).block_until_ready(); "
            "print(jax.config.jax_compilation_cache_dir)")
    out = _run(code, XDG_CACHE_HOME=str(tmp_path / "xdg"))
    assert out == str(tmp_path / "xdg" / "flexmerge_jax" / "xla")
    assert any((tmp_path / "xdg" / "flexmerge_jax" / "xla").iterdir())


def test_a_directory_the_program_chose_is_kept(monkeypatch, tmp_path):
    import jax

    monkeypatch.delenv(_cache.ENV)
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path))
    assert _cache.configure() is None
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
    monkeypatch.setenv(_cache.ENV, "off")
    assert _cache.configure() is None
    assert jax.config.jax_compilation_cache_dir is None
