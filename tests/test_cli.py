"""The flexmerge command line, end to end on a tiny zoo (3 tasks, few examples)."""

import json
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

import flexmerge_jax as fm
from flexmerge_jax import zoo
from flexmerge_jax.cli import main
from flexmerge_jax.sources import files


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    z = zoo.load().subset(3, 64)
    base = files.save_params(d / "base.npz", z.base)
    fts = [files.save_params(d / f"{t}.safetensors", f) for t, f in zip(z.task_names, z.finetuned)]
    return z, d, str(base), [str(f) for f in fts]


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_merge_plan_cut_inspect(tiny, capsys, tmp_path):
    z, d, base, fts = tiny
    code, out, err = run(capsys, "merge", "--base", base, "--finetuned", *fts, "--method", "ties",
                         "--keep", "0.2", "--blocks", "vit", "--size", "2", "--out", tmp_path / "m")
    assert code == 0, err
    model = fm.load(tmp_path / "m")
    ref = fm.plan(z.base, z.finetuned, blocks="vit", method=fm.methods.ties(keep=0.2),
                  task_names=z.task_names).at_size(2)
    assert model.n_models == ref.n_models and model.task_names == z.task_names
    for i in range(3):
        a = fm.tree.flatten(model.params_for_task(i))[1]
        b = fm.tree.flatten(ref.params_for_task(i))[1]
        assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))

    blocks_json = tmp_path / "blocks.json"
    blocks_json.write_text(json.dumps(fm.blocks.vit().block_names(fm.tree.leaf_names(z.base))))
    code, out, err = run(capsys, "plan", "--base", base, "--finetuned", *fts, "--method", "emr",
                         "--blocks", blocks_json, "--linkage", "none", "--similarity", "sign",
                         "--gram-precision", "float32", "--out", tmp_path / "plan")
    assert code == 0, err
    assert fm.load(tmp_path / "plan").config["gram_precision"] == "float32"
    code, out, err = run(capsys, "cut", tmp_path / "plan", "--size", "2.5", "--out", tmp_path / "c")
    assert code == 0, err
    cut = fm.load(tmp_path / "c")
    direct = fm.plan(base, fts, blocks="vit", method="emr", linkage=None,
                     similarity="sign").at_size(2.5)
    assert cut.n_models == direct.n_models
    code, out, err = run(capsys, "inspect", tmp_path / "c")
    assert code == 0 and "routing" in out and "blocks/3/mlp" in out
    code, out, err = run(capsys, "inspect", tmp_path / "plan")
    assert code == 0 and "step" in out and "inputs attached: True" in out
    # The plan's inputs moved: cut needs them again.
    moved = tmp_path / "moved"
    shutil.copytree(d, moved)
    shutil.move(d / "base.npz", tmp_path / "base_gone.npz")
    try:
        cut_args = ("cut", tmp_path / "plan", "--size", "3", "--out", tmp_path / "c2")
        code, out, err = run(capsys, *cut_args)
        assert code == 2 and "pass --base and --finetuned" in err
        code, out, err = run(capsys, *cut_args, "--base", moved / "base.npz", "--finetuned",
                             *[moved / (t + ".safetensors") for t in z.task_names])
        assert code == 0, err
    finally:
        shutil.move(tmp_path / "base_gone.npz", d / "base.npz")


def test_replaced_input_is_reported_in_one_line(tmp_path, capsys):
    z = zoo.load().subset(3, 16)
    base = files.save_params(tmp_path / "base.npz", z.base)
    fts = [files.save_params(tmp_path / f"{t}.npz", f) for t, f in zip(z.task_names, z.finetuned)]
    code, out, err = run(capsys, "plan", "--base", base, "--finetuned", *fts, "--method", "ta",
                         "--blocks", "vit", "--out", tmp_path / "plan")
    assert code == 0, err
    fts[1].unlink()
    files.save_params(fts[1], jax.tree.map(lambda v: v * 2, z.finetuned[1]))  # re-trained
    code, out, err = run(capsys, "cut", tmp_path / "plan", "--size", "2", "--out", tmp_path / "c")
    assert code == 2 and "pass --base and --finetuned" in err
    assert err.startswith("flexmerge: warning: loaded the plan without its inputs")
    assert f"changed since planning: task 'fmnist_tops' {fts[1]} (content differs)" in err
    assert ".py:" not in err
    code, out, err = run(capsys, "cut", tmp_path / "plan", "--size", "2", "--out", tmp_path / "c",
                         "--base", base, "--finetuned", *fts, "--quiet")
    assert code == 0 and err.count("\n") == 1
    assert err.startswith("flexmerge: warning: the attached inputs are not the ones")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["merge", "--base", "nope.npz", "--finetuned", "a.npz", "b.npz", "--method", "ta",
          "--size", "1", "--out", "x"], "nope.npz: no such file"),
        (["merge", "--method", "magic", "--size", "1", "--out", "x"], "unknown method 'magic'"),
        (["merge", "--method", "ties", "--keep", "1.5", "--size", "1", "--out", "x"],
         "keep must be in"),
        (["merge", "--method", "ta", "--size", "9", "--out", "x"], "size 9.0 outside"),
        (["merge", "--method", "ta", "--blocks", "nosuchpreset", "--size", "1", "--out", "x"],
         "unknown block preset"),
        (["merge", "--method", "ta", "--linkage", "ward", "--size", "1", "--out", "x"],
         "linkage must be"),
        (["merge", "--method", "slerp", "--hp", "t", "--size", "1", "--out", "x"],
         "expected NAME=VALUE"),
        (["merge", "--method", "breadcrumbs", "--hp", "tpo=0.1", "--size", "1", "--out", "x"],
         "--method breadcrumbs:"),
        (["merge", "--method", "ties", "--keep", "0.2", "--hp", "keep=0.3", "--size", "1", "--out",
          "x"], "--hp keep: given twice"),
    ],
)
def test_user_errors_are_one_line(tiny, capsys, tmp_path, argv, message):
    z, d, base, fts = tiny
    if "--base" not in argv:
        argv = argv[:1] + ["--base", base, "--finetuned", *fts] + argv[1:]
    argv = [a if a != "x" else str(tmp_path / "x") for a in argv] + ["--quiet"]
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_mismatched_file_is_named(tiny, capsys, tmp_path):
    z, d, base, fts = tiny
    bad = dict(z.finetuned[1])
    bad["proj"] = {"kernel": np.zeros((64, 32), np.float32)}
    path = files.save_params(tmp_path / "bad.npz", bad)
    code, out, err = run(capsys, "plan", "--base", base, "--finetuned", fts[0], path,
                         "--method", "ta", "--out", tmp_path / "p")
    assert code == 2 and "bad.npz" in err and "proj/kernel" in err


def test_inspect_foreign_directory(capsys, tmp_path):
    code, out, err = run(capsys, "inspect", tmp_path)
    assert code == 2 and "not a flexmerge_jax checkpoint" in err


def test_demo_on_tiny_zoo(capsys, tmp_path):
    code, out, err = run(capsys, "demo", "--tasks", "3", "--examples", "64", "--methods", "avg,emr",
                         "--sizes", "1,2,2.5,3", "--out", tmp_path, "--no-progress")
    assert code == 0, err
    res = fm.SweepResult.from_json(json.loads((tmp_path / "sweep.json").read_text()))
    assert (tmp_path / "sweep.png").stat().st_size > 10_000 and (tmp_path / "sweep.csv").exists()
    avg = res.curve("avg")
    assert avg[0].n_models == 1.0 and avg[-1].n_models == 3.0
    assert avg[-1].avg_normalized == 1.0  # size n: the fine-tuned models themselves
    assert min(p.n_models for p in res.curve("emr")) == pytest.approx(2 + 3 / 32)
    assert "normalized accuracy" in out


def test_console_script_entry_point(tmp_path):
    exe = shutil.which("flexmerge")
    cmd = [exe] if exe else [sys.executable, "-m", "flexmerge_jax.cli"]
    r = subprocess.run(cmd + ["inspect", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("flexmerge: error:")
    assert "Traceback" not in r.stderr
    r = subprocess.run(cmd + ["--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "demo" in r.stdout


RUN = """
import atexit, sys, threading, time
import flexmerge_jax.cli as cli


class Finalized:  # says so when the interpreter tears its modules down
    def __del__(self):
        print("finalized", flush=True)


keep = Finalized()
atexit.register(print, "atexit ran")  # unflushed: run() must flush after the handlers
# Work a thread still does after main returns is waited for, as at any exit.
threading.Thread(target=lambda: (time.sleep(0.5), print("thread done", flush=True))).start()
sys.argv = ["flexmerge", *sys.argv[1:]]
cli.run()
"""


def test_run_exits_at_once_after_atexit_handlers(tiny, tmp_path):
    """The console script flushes its output, runs the atexit handlers (jax's
    clean-up, distributed shutdown) and ends with main's code, skipping the
    interpreter's teardown (a tenth of a one-shot merge's time)."""
    z, d, base, fts = tiny
    out = tmp_path / "m"
    r = subprocess.run([sys.executable, "-c", RUN, "merge", "--base", base, "--finetuned", *fts,
                        "--method", "ta", "--blocks", "vit", "--size", "1", "--out", str(out),
                        "--quiet"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"saved 1.0000x model to {out}" in r.stdout  # flushed before the exit
    assert r.stdout.rstrip().endswith("atexit ran") and "finalized" not in r.stdout
    assert "thread done" in r.stdout
    merged = fm.tree.flatten(fm.load(out).params_for_task(0))[1]
    want = fm.tree.flatten(fm.merge(z.base, z.finetuned, "ta", blocks="vit"))[1]
    assert all(np.allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
               for a, b in zip(merged, want))
    r = subprocess.run([sys.executable, "-c", RUN, "inspect", str(tmp_path / "missing")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.startswith("flexmerge: error:")
    assert "atexit ran" in r.stdout
    # stdout closed at start-up (`flexmerge ... >&-`): Python's sys.stdout is None.
    r = subprocess.run(["sh", "-c", 'exec "$0" "$@" >&-', sys.executable, "-c", RUN, "inspect",
                        str(out)], stderr=subprocess.PIPE, text=True, timeout=300)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr


def test_closed_stdout_ends_quietly(tiny, tmp_path, monkeypatch):
    """`flexmerge inspect DIR | head -1`: the reader is gone; exit 141, no traceback."""
    import os

    z, d, base, fts = tiny
    code = main(["merge", "--base", base, "--finetuned", *fts, "--method", "ta",
                 "--blocks", "vit", "--size", "3", "--out", str(tmp_path / "m")])
    assert code == 0
    r, w = os.pipe()
    os.close(r)  # nobody reads: writes fail with EPIPE (BrokenPipeError)
    with open(w, "w") as closed:
        monkeypatch.setattr(sys, "stdout", closed)
        assert main(["inspect", str(tmp_path / "m")]) == 141


def test_existing_out_fails_before_any_work(capsys, tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "results.csv").write_text("")
    for argv in (["merge", "--method", "ta", "--size", "2"], ["plan", "--method", "ta"]):
        code, out, err = run(capsys, *argv, "--base", tmp_path / "missing.npz", "--finetuned",
                             tmp_path / "a.npz", tmp_path / "b.npz", "--out", tmp_path / "m")
        # Reported before the inputs are even looked at (planning can take minutes).
        assert code == 2 and "exists; pass --overwrite" in err and "missing" not in err


def test_any_factory_argument_through_hp(tiny, capsys, tmp_path):
    z, d, base, fts = tiny
    code, out, err = run(capsys, "merge", "--base", base, "--finetuned", *fts, "--method",
                         "breadcrumbs", "--hp", "top=0.05", "--hp", "bottom=0.6", "--blocks", "vit",
                         "--size", "1", "--out", tmp_path / "m", "--quiet")
    assert code == 0, err
    got = fm.load(tmp_path / "m").params_for_task(0)
    want = fm.merge(z.base, z.finetuned, fm.methods.breadcrumbs(top=0.05, bottom=0.6), blocks="vit")
    default = fm.merge(z.base, z.finetuned, fm.methods.breadcrumbs(), blocks="vit")
    a, b, c = (fm.tree.flatten(t)[1] for t in (got, want, default))
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))
    assert not all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, c))


def test_cli_reference_is_current():
    """docs/cli.md holds every subcommand's --help (regenerate: python docs/cli_reference.py)."""
    import runpy
    from pathlib import Path

    gen = runpy.run_path(str(Path(__file__).resolve().parents[1] / "docs" / "cli_reference.py"))
    text = gen["DOC"].read_text()
    assert gen["render"](text) == text, "docs/cli.md is stale: run python docs/cli_reference.py"
