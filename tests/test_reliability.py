"""Fault injection: concurrent saves, directories appearing mid-save, user
files under ``overwrite``, kill -9, Ctrl-C/SIGTERM, a full disk, read-only
targets. docs/reliability.md lists what each gets; these tests keep it true."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

import flexmerge_jax as fm
from flexmerge_jax import checkpointing
from flexmerge_jax.cli import main
from flexmerge_jax.sources import files

from conftest import random_case

REPO = Path(__file__).resolve().parents[1]


def leftovers(d: Path, name: str) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.startswith(f".{name}."))


@pytest.fixture(scope="module")
def small():
    base, fts = random_case(0, n=3)
    return base, fts, fm.plan(base, fts, blocks="by-layer", method="ta")


def test_concurrent_saves_exactly_one_succeeds(small, tmp_path, monkeypatch):
    *_, plan = small
    barrier = threading.Barrier(2, timeout=30)
    write_json = checkpointing._write_json

    def finished_together(path, obj):  # both saves reach their claim at once
        write_json(path, obj)
        barrier.wait()

    monkeypatch.setattr(checkpointing, "_write_json", finished_together)
    results = []

    def save():
        try:
            fm.save(tmp_path / "p", plan)
            results.append("saved")
        except ValueError as e:
            results.append(str(e))

    threads = [threading.Thread(target=save) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(results)[1] == "saved", results
    assert "created by someone else while this save was writing" in sorted(results)[0]
    assert fm.load(tmp_path / "p").num_steps == plan.num_steps
    assert leftovers(tmp_path, "p") == []


def test_directory_created_during_the_save_is_left_alone(small, tmp_path, monkeypatch):
    *_, plan = small
    target = tmp_path / "p"
    write_json = checkpointing._write_json

    def someone_creates_it(path, obj):
        write_json(path, obj)
        target.mkdir()
        (target / "results.csv").write_text("acc\n0.9\n")

    monkeypatch.setattr(checkpointing, "_write_json", someone_creates_it)
    with pytest.raises(ValueError, match="created by someone else.*left as it is"):
        fm.save(target, plan)
    assert os.listdir(target) == ["results.csv"]
    assert leftovers(tmp_path, "p") == []


def test_overwrite_never_deletes_files_it_did_not_write(small, tmp_path, capsys):
    base, fts, plan = small
    model = fm.merge(base, fts, fm.methods.emr())
    fm.save(tmp_path / "m", model)
    (tmp_path / "m" / "eval.json").write_text("{}")
    (tmp_path / "m" / "notes").mkdir()
    (tmp_path / "m" / "notes" / "a.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"did not write \(eval.json, notes/\); not replaced"):
        fm.save(tmp_path / "m", model, overwrite=True)
    assert (tmp_path / "m" / "eval.json").exists() and (tmp_path / "m" / "notes" / "a.txt").exists()
    fm.load(tmp_path / "m")  # still the complete model
    # The CLI refuses before any work (the inputs are not even looked at).
    code = main(["plan", "--base", str(tmp_path / "missing.npz"), "--finetuned", "a.npz", "b.npz",
                 "--method", "ta", "--out", str(tmp_path / "m"), "--overwrite"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "eval.json" in err and "missing" not in err
    # Without the user's files it is replaced.
    (tmp_path / "m" / "eval.json").unlink()
    import shutil

    shutil.rmtree(tmp_path / "m" / "notes")
    fm.save(tmp_path / "m", plan, overwrite=True)
    assert fm.load(tmp_path / "m").num_steps == plan.num_steps
    assert leftovers(tmp_path, "m") == []


def test_files_added_while_overwriting_are_kept(small, tmp_path, monkeypatch):
    *_, plan = small
    fm.save(tmp_path / "p", plan)
    write_json = checkpointing._write_json

    def user_adds_a_file(path, obj):  # after the first check, before the replacement
        write_json(path, obj)
        (tmp_path / "p" / "late.txt").write_text("mine")

    monkeypatch.setattr(checkpointing, "_write_json", user_adds_a_file)
    with pytest.raises(ValueError, match=r"did not write \(late.txt\)"):
        fm.save(tmp_path / "p", plan, overwrite=True)
    assert (tmp_path / "p" / "late.txt").read_text() == "mine"
    fm.load(tmp_path / "p")
    assert leftovers(tmp_path, "p") == []


def test_empty_directory_is_a_free_target(small, tmp_path, monkeypatch):
    *_, plan = small
    (tmp_path / "p").mkdir()  # before the save (e.g. tempfile.mkdtemp())
    fm.save(tmp_path / "p", plan)
    assert fm.load(tmp_path / "p").num_steps == plan.num_steps
    write_json = checkpointing._write_json

    def someone_creates_it(path, obj):  # or during it: it holds nothing to lose either
        write_json(path, obj)
        (tmp_path / "q").mkdir()

    monkeypatch.setattr(checkpointing, "_write_json", someone_creates_it)
    fm.save(tmp_path / "q", plan)
    assert fm.load(tmp_path / "q").num_steps == plan.num_steps


def run_python(code: str, *args, timeout=120):
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=env)


def test_kill_9_mid_save_then_a_clean_rerun(small, tmp_path):
    base, fts, _ = small
    r = run_python("""
        import os, signal, sys
        sys.path.insert(0, sys.argv[2])
        import flexmerge_jax as fm
        from flexmerge_jax import checkpointing
        from conftest import random_case

        base, fts = random_case(0, n=3)
        checkpointing.PART_BYTES = 1  # one Orbax item per block
        write = checkpointing._Writer.write
        def die(self, path, arrays):  # killed with the first block written
            write(self, path, arrays)
            self._ckpt.wait_until_finished()
            os.kill(os.getpid(), signal.SIGKILL)
        checkpointing._Writer.write = die
        fm.save(sys.argv[1], fm.merge(base, fts, fm.methods.emr()))
    """, tmp_path / "m", REPO / "tests")
    assert r.returncode == -signal.SIGKILL, r.stderr
    stale = leftovers(tmp_path, "m")
    assert len(stale) == 1 and stale[0].startswith(".m.tmp-")
    model = fm.merge(base, fts, fm.methods.emr())
    fm.save(tmp_path / "m", model)  # removes the dead process's temporary
    assert leftovers(tmp_path, "m") == []
    assert fm.load(tmp_path / "m").n_models == model.n_models


def test_a_live_processes_temporary_is_kept(small, tmp_path):
    *_, plan = small
    live = tmp_path / f".p.tmp-{fm._atomic._host()}-{os.getppid()}-0123abcd"
    live.mkdir()
    fm.save(tmp_path / "p", plan)
    assert live.exists()


@pytest.mark.parametrize("sig, code, word", [(signal.SIGINT, 130, "interrupted"),
                                              (signal.SIGTERM, 143, "terminated")])
def test_ctrl_c_and_sigterm_while_writing(tmp_path, sig, code, word):
    base, fts = random_case(1, n=3)
    fm.save_params(tmp_path / "base.safetensors", base)
    paths = [fm.save_params(tmp_path / f"t{i}.npz", f) for i, f in enumerate(fts)]
    r = run_python(f"""
        import os, signal, sys
        from flexmerge_jax import checkpointing
        from flexmerge_jax.cli import main
        # A shell's background job starts with SIGINT ignored (as under a CI
        # runner); Ctrl-C at a terminal meets Python's own handler.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        checkpointing.PART_BYTES = 1  # one Orbax item per block
        write, calls = checkpointing._Writer.write, []
        def signalled(self, path, arrays):  # the signal arrives with the second block
            calls.append(path)
            if len(calls) == 2:
                os.kill(os.getpid(), {int(sig)})
            write(self, path, arrays)
        checkpointing._Writer.write = signalled
        sys.exit(main(sys.argv[1:]))
    """, "merge", "--base", tmp_path / "base.safetensors", "--finetuned", *paths, "--method", "ta",
        "--blocks", "by-layer", "--size", "3", "--out", tmp_path / "m", "--quiet")
    assert r.returncode == code, r.stderr
    assert r.stderr == f"flexmerge: {word}; no partial output left\n" if sig == signal.SIGINT \
        else r.stderr == "flexmerge: terminated (SIGTERM); no partial output left\n"
    assert not (tmp_path / "m").exists() and leftovers(tmp_path, "m") == []


@contextlib.contextmanager
def small_filesystem(path: Path, size: str, *options):
    """A tmpfs of ``size`` at ``path`` (root only), else ``None``."""
    path.mkdir()
    opts = ",".join((f"size={size}",) + options)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)],
                       capture_output=True) if os.geteuid() == 0 else None
    try:
        yield r is not None and r.returncode == 0
    finally:
        if r is not None and r.returncode == 0:
            subprocess.run(["umount", str(path)], check=True)


def disk_full(path: Path):
    """Fails as ``_Writer.write`` does when TensorStore finds the disk full."""
    with files.os_errors(path):
        raise ValueError(f"RESOURCE_EXHAUSTED: Error writing {path}: Failed to write 171 bytes to "
                         "file 4: No space left on device [os_error_code='28']")


# Orbax's and TensorStore's own threads fail too (pytest reports each as a
# warning); the CLI prints one line.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_disk_full_is_one_line_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    base, fts = random_case(2, n=3, shapes={f"l{i}.w": (128, 128) for i in range(4)})
    fm.save_params(tmp_path / "base.safetensors", base)
    paths = [str(fm.save_params(tmp_path / f"t{i}.npz", f)) for i, f in enumerate(fts)]
    with small_filesystem(tmp_path / "disk", "256k") as mounted:
        if not mounted:  # not root: a write that fails as TensorStore's does
            def full(self, path, arrays):
                disk_full(path)
            monkeypatch.setattr(checkpointing._Writer, "write", full)
        out = tmp_path / "disk" / "m"
        code = main(["merge", "--base", str(tmp_path / "base.safetensors"), "--finetuned", *paths,
                     "--method", "ta", "--blocks", "by-layer", "--size", "3", "--out", str(out),
                     "--quiet"])
        err = capsys.readouterr().err
        assert code == 2 and err == f"flexmerge: error: {out}: No space left on device\n"
        assert os.listdir(tmp_path / "disk") == []
        with pytest.raises(OSError, match="No space left on device") as e:
            fm.save_cut(out, fm.plan(base, fts, blocks="by-layer", method="ta"), size=3)
        assert e.value.filename == str(out) and os.listdir(tmp_path / "disk") == []


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_save_params_to_a_full_disk_is_one_oserror_and_leaves_nothing(tmp_path):
    base, _ = random_case(2, n=1, shapes={f"l{i}.w": (128, 128) for i in range(8)})
    with small_filesystem(tmp_path / "disk", "256k") as mounted:
        if not mounted:
            pytest.skip("needs root to mount a small tmpfs")
        for name in ("p", "p.npz", "p.safetensors"):
            with pytest.raises(OSError, match="No space left on device") as e:
                fm.save_params(tmp_path / "disk" / name, base)
            assert e.value.filename == str(tmp_path / "disk" / name)
            assert os.listdir(tmp_path / "disk") == [], name


def test_a_write_landing_after_a_failure_leaves_nothing(small, tmp_path, monkeypatch):
    # A failed Orbax save reports its first error while TensorStore may still
    # be writing other arrays; such a write recreates the directories it
    # writes into (here: a thread that lands one as soon as the part's
    # directory has been removed). CI's disk-full test left
    # `.m.tmp-*/arrays/p00000.orbax-checkpoint-tmp/ocdbt.process_0/d` so.
    *_, plan = small
    late = []

    def full(self, path, arrays):
        data = path.with_name(path.name + ".orbax-checkpoint-tmp") / "ocdbt.process_0" / "d"
        data.mkdir(parents=True)

        def land():
            for _ in range(10_000):
                if not self.directory.exists():
                    data.mkdir(parents=True)
                    return
                time.sleep(0.001)

        late.append(threading.Thread(target=land))
        late[0].start()
        disk_full(path)

    monkeypatch.setattr(checkpointing._Writer, "write", full)
    with pytest.raises(OSError, match="No space left on device"):
        fm.save_cut(tmp_path / "m", plan, size=3)
    late[0].join()
    assert os.listdir(tmp_path) == []


def test_unwritable_output_fails_before_any_work(tmp_path, capsys):
    argv = ["merge", "--base", str(tmp_path / "missing.npz"), "--finetuned", "a.npz", "b.npz",
            "--method", "ta", "--size", "2", "--out"]
    (tmp_path / "file").write_text("x")
    code = main(argv + [str(tmp_path / "file" / "m")])
    err = capsys.readouterr().err
    assert code == 2 and err == (f"flexmerge: error: {tmp_path / 'file' / 'm'}: the parent "
                                 f"directory {tmp_path / 'file'} is not a directory\n")
    code = main(argv + [str(tmp_path / "nodir" / "m")])
    assert code == 2 and "nodir does not exist" in capsys.readouterr().err
    with small_filesystem(tmp_path / "ro", "64k", "ro") as mounted:
        if not mounted:
            if os.geteuid() == 0:
                pytest.skip("cannot mount a read-only tmpfs")
            (tmp_path / "ro").chmod(0o555)
        code = main(argv + [str(tmp_path / "ro" / "m")])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and "missing" not in err
        assert f"cannot write in {tmp_path / 'ro'}" in err


def test_debug_shows_the_traceback(tmp_path, capsys):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "x").write_text("x")
    argv = ["plan", "--base", "b.npz", "--finetuned", "a.npz", "c.npz", "--method", "ta",
            "--out", str(tmp_path / "m")]
    assert main(argv) == 2 and "Traceback" not in capsys.readouterr().err
    assert main(argv + ["--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.endswith("exists; pass --overwrite to replace it\n")


# ----------------------------------------------------------------- changed inputs


def edit_between_samples(path: Path, keep_mtime=False):
    """Zeroes 50 float32 values of a file where the sampled fingerprint does
    not look (its samples: 64 x 4 KiB spread over the file)."""
    st = path.stat()
    raw = bytearray(path.read_bytes())
    assert len(raw) > 64 * 4096 * 2
    raw[4200:4400] = bytes(200)  # between the first two samples
    path.write_bytes(bytes(raw))
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.fixture
def files_plan(tmp_path):
    """A ta plan of 3 random models (512 KiB .safetensors files)."""
    base, fts = random_case(3, n=3, shapes={"l0.w": (256, 256), "l1.w": (256, 256)})
    fm.save_params(tmp_path / "base.safetensors", base)
    paths = [fm.save_params(tmp_path / f"t{i}.safetensors", f) for i, f in enumerate(fts)]
    return base, fts, paths, fm.plan(tmp_path / "base.safetensors", paths, blocks="by-layer",
                                     method="ta")


@pytest.mark.parametrize("edit", ["rewritten", "50 values in place", "deleted"])
def test_live_plan_rechecks_its_files_before_a_cut(files_plan, tmp_path, edit):
    base, fts, paths, plan = files_plan
    before = plan.at_size(2.0)
    if edit == "rewritten":
        paths[1].unlink()
        fm.save_params(paths[1], {k: v + 1 for k, v in fts[1].items()})
        why = r"\(content differs\)"
    elif edit == "50 values in place":
        edit_between_samples(paths[1])
        why = r"\(modified since"
    else:
        paths[1].unlink()
        why = r"\(no longer exists\)"
    match = rf"input files changed since they were read: task 't1' {paths[1]} {why}"
    with pytest.raises(ValueError, match=match):
        plan.at_size(2.0)
    with pytest.raises(ValueError, match=match):
        fm.save_cut(tmp_path / "cut", plan, size=2.0)
    assert not (tmp_path / "cut").exists()
    if edit != "deleted":  # attached again explicitly: the new values, with a warning
        with pytest.warns(UserWarning, match="not the ones this plan was computed from"):
            plan.attach(tmp_path / "base.safetensors", paths)
        assert plan.at_size(2.0).n_models == before.n_models


def test_missing_input_is_named_in_the_warning_and_the_error(files_plan, tmp_path):
    *_, paths, plan = files_plan
    fm.save(tmp_path / "plan", plan)
    paths[2].rename(tmp_path / "elsewhere.npz")
    with pytest.warns(UserWarning, match=rf"without its inputs.*task 't2' {paths[2]} "
                                         r"\(no longer exists\)"):
        bare = fm.load(tmp_path / "plan")
    with pytest.raises(ValueError, match=rf"no inputs attached: .*{paths[2]} \(no longer exists\)"):
        bare.at_size(2.0)


def test_in_memory_inputs_that_differ_are_named(tmp_path):
    base, fts = random_case(4, n=3)
    plan = fm.plan(base, fts, blocks="by-layer", method="ta", task_names=["a", "b", "c"])
    fm.save(tmp_path / "plan", plan)
    with warnings_as_errors():
        fm.load(tmp_path / "plan", base=base, finetuned=fts)  # the same: no word
    other = [fts[0], {k: v * 1.01 for k, v in fts[1].items()}, fts[2]]
    with pytest.warns(UserWarning, match=r"not the ones this plan was computed from \(task 'b' "
                                         r"\(its values differ from the planned ones\)\)"):
        fm.load(tmp_path / "plan", base=base, finetuned=other)
    # One value changed: the samples may miss it; a plan made with verify="full" does not.
    one = dict(fts[2])
    one["l1.mlp.w"] = one["l1.mlp.w"].copy()
    one["l1.mlp.w"][2, 3] += 1.0
    plan_full = fm.plan(base, fts, blocks="by-layer", method="ta", verify="full")
    fm.save(tmp_path / "full", plan_full)
    with pytest.warns(UserWarning, match=r"task 'task2' \(its values differ"):
        fm.load(tmp_path / "full", base=base, finetuned=[fts[0], fts[1], one])


def test_verify_full_accepts_copies_and_catches_edits(files_plan, tmp_path, capsys):
    base, fts, paths, _ = files_plan
    argv = ["plan", "--base", str(tmp_path / "base.safetensors"), "--finetuned", *map(str, paths),
            "--method", "ta", "--blocks", "by-layer", "--verify", "full", "--out",
            str(tmp_path / "plan")]
    assert main(argv) == 0, capsys.readouterr().err
    copies = tmp_path / "copies"
    copies.mkdir()
    for p in [tmp_path / "base.safetensors", *paths]:
        (copies / p.name).write_bytes(p.read_bytes())  # new modification times
    with warnings_as_errors():
        fm.load(tmp_path / "plan", base=copies / "base.safetensors",
                finetuned=[copies / p.name for p in paths])
    edit_between_samples(paths[0], keep_mtime=True)  # an edit that keeps the mtime
    with pytest.warns(UserWarning, match=rf"task 't0' {paths[0]} \(content differs\)"):
        assert not fm.load(tmp_path / "plan").has_inputs


@contextlib.contextmanager
def warnings_as_errors():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


# ------------------------------------------------------- damaged saved directories


def edit_meta(d: Path, fn) -> None:
    meta = json.loads((d / "flexmerge.json").read_text())
    fn(meta)
    (d / "flexmerge.json").write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def saved(tmp_path_factory, small):
    base, fts, plan = small
    d = tmp_path_factory.mktemp("saved")
    fm.save(d / "model", plan.at_size(2.0))
    fm.save(d / "plan", plan)
    return d


def _routing_out_of_range(m):
    m["blocks"][0]["routing"][1] = 7


def _fewer_task_names(m):
    m["task_names"] = m["task_names"][:2]


def _block_renamed(m):
    m["blocks"][1]["name"] = "l9."


def _unknown_parameter(m):
    m["partition"]["blocks"][0][1][0] = "nope.w"


def _no_routing(m):
    del m["blocks"][0]["routing"]


def _plan_task_out_of_range(m):
    m["sequences"][0]["a"][0] = 5


def _plan_order_repeats(m):
    m["order"][1][1] = m["order"][1][0]
    m["order"][0][1] = m["order"][0][0]


@pytest.mark.parametrize("item, edit, message", [
    ("model", _routing_out_of_range, r"block 'emb': routing \[.*\] names parameter sets outside"),
    ("model", _fewer_task_names, "block 'emb' routes 3 tasks, but 2 task names are listed"),
    ("model", _block_renamed, "block 'l9.' where the partition has 'l0.attn.w'"),
    ("model", _unknown_parameter, "block 'emb' names parameter \\['nope.w'\\] missing"),
    ("model", _no_routing, r"malformed \(KeyError: 'routing'\)"),
    ("plan", _fewer_task_names, "block 'emb': 2 merges in 'a'; 2 tasks make 1"),
    ("plan", _plan_task_out_of_range, r"block 'emb': merges name tasks outside 0..2"),
    ("plan", _plan_order_repeats, "the order does not name each of the 7 x 2 merges once"),
], ids=lambda x: getattr(x, "__name__", None))
def test_hand_edited_flexmerge_json_is_named(saved, tmp_path, item, edit, message):
    import shutil

    d = tmp_path / item
    shutil.copytree(saved / item, d)
    edit_meta(d, edit)
    with pytest.raises(ValueError, match=rf"{d / 'flexmerge.json'}: {message}"):
        fm.load(d)


def test_arrays_that_do_not_match_flexmerge_json_are_named(saved, tmp_path):
    import shutil

    d = tmp_path / "model"
    shutil.copytree(saved / "model", d)
    edit_meta(d, lambda m: m["blocks"][0]["masked"].append(False))  # a set that is not there
    with pytest.raises(ValueError, match=r"flexmerge.json: arrays/p00000/b00000 lacks 'sets/3'"):
        fm.load(d)
    shutil.rmtree(d)
    shutil.copytree(saved / "model", d)
    (d / "arrays" / "p00000" / "_METADATA").write_text("{not json")
    with pytest.raises(ValueError, match=r"arrays/p00000: cannot read this Orbax checkpoint"):
        fm.load(d)


def test_damaged_orbax_input_is_named(tmp_path):
    base, fts = random_case(5, n=2)
    ck = fm.save_params(tmp_path / "base_ck", base)
    (ck / "_METADATA").write_text("{not json")
    with pytest.raises(ValueError, match=rf"{ck}: cannot read orbax params \(no readable tree "
                                         r"metadata \(_METADATA missing or damaged\)\)"):
        fm.load_params(ck)
    (ck / "_METADATA").write_text("{}")
    with pytest.raises(ValueError, match=r"\(no field 'tree_metadata' in its metadata\)"):
        fm.plan(ck, [ck, ck])


# ------------------------------------------------------------------ bad values


def test_nan_in_the_base_is_blamed_on_the_base(tmp_path):
    base, fts = random_case(6, n=3)
    base["l0.mlp.b"][2] = np.nan
    with pytest.raises(ValueError, match=r"^the base model: parameter 'l0.mlp.b' has NaN or Inf"):
        fm.plan(base, fts, method="ta")
    fts[1]["l0.mlp.b"][2] = np.inf
    base["l0.mlp.b"][2] = 0.0
    with pytest.raises(ValueError, match=r"^task 1 \(task1\): the task vector of parameter "
                                         r"'l0.mlp.b' has NaN or Inf"):
        fm.plan(base, fts, method="ta")


def test_npz_of_python_objects_is_named(tmp_path):
    base, fts = random_case(7, n=2)
    np.savez(tmp_path / "obj.npz", **{**base, "emb": np.array([{"a": 1}], dtype=object)})
    with pytest.raises(ValueError, match=rf"{tmp_path / 'obj.npz'}: parameter 'emb' is an array "
                                         r"of Python objects"):
        fm.load_params(tmp_path / "obj.npz")


def test_a_block_name_shadowed_by_an_earlier_one_is_warned(small):
    base, fts, _ = small
    with pytest.warns(fm.blocks.ShadowedBlockWarning,
                      match=r"block 'l1.mlp' is empty: every parameter containing it "
                            r"\('l1.mlp.w'\) belongs to the earlier block 'l1.'"):
        p = fm.plan(base, fts, blocks=["l1.", "l1.mlp", "l0.", "emb"], method="ta")
    assert p.partition.names == ("l1.", "l0.", "emb")


def test_float64_and_float16_inputs(small):
    base, fts, _ = small
    ta = fm.methods.task_arithmetic(1.0, convention="sum")
    b64 = {k: v.astype(np.float64) for k, v in base.items()}
    f64 = [{k: v.astype(np.float64) for k, v in f.items()} for f in fts]
    plan = fm.plan(b64, f64, blocks="by-layer", method=ta)
    for size in (1.0, 2.0):  # all merged; some merged, some per task
        model = plan.at_size(size)
        for i in range(3):  # merged and unmerged leaves alike: the inputs' dtype
            params = model.params_for_task(i)
            assert {np.asarray(v).dtype for v in params.values()} == {np.dtype(np.float64)}
    one = plan.at_size(1.0).params_for_task(0)
    for k, b in b64.items():  # the float32 computation, widened: within float32 rounding
        np.testing.assert_allclose(one[k], b + sum(f[k] - b for f in f64), rtol=1e-6, atol=1e-6)
    # float16: a merge whose sum passes 65504 is reported, naming block and parameter.
    b16 = {k: np.zeros_like(v, np.float16) for k, v in base.items()}
    f16 = [{k: np.full_like(v, 30000 + i, np.float16) for k, v in base.items()} for i in range(3)]
    with pytest.warns(UserWarning,
                      match=r"block '.*': the merged parameter '.*' overflows float16"):
        fm.plan(b16, f16, blocks="by-layer", method=ta).at_size(1.0)
    # A block mixing float16 and float32 parameters (merged as one float32 row, then cast):
    # the float16 one's overflow is reported by name too, and nothing else warns.
    name = next(k for k in base if k.startswith("l0."))
    b_mix = {**base, name: b16[name]}
    f_mix = [{**f, name: g[name]} for f, g in zip(fts, f16)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = fm.plan(b_mix, f_mix, blocks=["l0.", "l1.", "emb"], method=ta).at_size(1.0)
    assert [str(w.message) for w in caught] == [
        f"block 'l0.': the merged parameter {name!r} overflows float16 (Inf entries; the "
        "largest float16 is 65504): merge float32 copies of the inputs instead"]
    assert model.params_for_task(0)[name].dtype == np.float16
